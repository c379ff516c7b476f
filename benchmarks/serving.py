"""ps-serve under load, and what readers cost a training job (issue 17).

    python benchmarks/serving.py                  # about 4 minutes on 2 cores
    python benchmarks/serving.py --quick          # a smoke run of every section (tests)

1. **Capacity**: requests/s one replica answers with 32 requests always in flight (closed loop).
2. **Open loop**: 1, 2 and 4 replicas at offered rates that are multiples of that capacity; each
   request is sent at its Poisson arrival time whatever the others do, and its latency counts from
   then: throughput, p50 and p99.
3. **Routing**: two replicas, one slowed by ``--slow-ms`` per example; least-in-flight
   routing against round-robin, same load, same run.
4. **Refresh lag**: a live sync job served with ``--from-job``; from the end of a training step
   to the first response that the new version answers.
5. **Readers**: the step time of a two-worker sync job with 0 readers and with 4 reader processes
   taking snapshots continuously.

The load generator (asyncio, aiohttp) runs in this process, on the same cores as the replicas.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import click
import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psframework as ps  # noqa: E402
from benchmarks._common import ROOT, child_env, tail  # noqa: E402
from psframework.procs import python_module, spawn, stop_all  # noqa: E402

MODEL = "benchmarks._serving_model:mlp"
EXAMPLE = json.dumps({"inputs": [0.5] * 256}).encode()


@contextmanager
def serving(log_dir: Path, *args: str, env: dict | None = None):
    log = log_dir / f"serve-{time.monotonic_ns()}.log"
    with open(log, "wb") as out:
        proc = spawn(python_module("psframework.serve.cli", *args, "--port", "0"), {**child_env(), **(env or {})},
                     stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        deadline = time.monotonic() + 120
        while "PS_SERVE_ADDRESS=" not in log.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"ps-serve did not start:\n{tail(log)}")
            time.sleep(0.05)
        yield log.read_text().split("PS_SERVE_ADDRESS=", 1)[1].split()[0]
    finally:
        stop_all([proc])


# -- load ----------------------------------------------------------------------------------


async def _post(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.post(url, data=EXAMPLE, headers={"content-type": "application/json"}) as answer:
            await answer.read()
            return answer.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


def _session(connections: int = 0) -> aiohttp.ClientSession:
    # aiohttp, not httpx: httpx's connection pool costs more per request than the service answers one
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                 timeout=aiohttp.ClientTimeout(total=60))


async def closed_loop(address: str, concurrency: int, seconds: float) -> float:
    """Requests/s with ``concurrency`` requests always in flight."""
    url, done = f"{address}/predict", 0
    stop = time.monotonic() + seconds
    async with _session(concurrency) as session:
        async def loop():
            nonlocal done
            while time.monotonic() < stop:
                ok = await _post(session, url)  # not "done += await": that reads done before the wait
                done += ok
        await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / seconds


async def _arrivals(address: str, rate: float, seconds: float, seed: int) -> tuple[list[float], int, float]:
    """Poisson arrivals at ``rate``/s for ``seconds``: each answered request's latency from its
    arrival, the failures, and the time until the last answer."""
    rng, url = random.Random(seed), f"{address}/predict"
    arrivals, t = [], 0.0
    while (t := t + rng.expovariate(rate)) < seconds:
        arrivals.append(t)
    latencies, failed = [], 0
    async with _session() as session:
        start = time.monotonic()

        async def one(at: float):
            nonlocal failed
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            ok = await _post(session, url)
            if ok:
                latencies.append(time.monotonic() - start - at)
            else:
                failed += 1
        await asyncio.gather(*(one(at) for at in arrivals))
        return latencies, failed, time.monotonic() - start


def _arrivals_in_process(args) -> tuple[list[float], int, float]:
    return asyncio.run(_arrivals(*args))


def open_loop(address: str, rate: float, seconds: float, seed: int = 0, procs: int = 1) -> dict:
    """Open-loop load from ``procs`` processes (one asyncio loop tops out near 1,500 requests/s)."""
    if procs == 1:
        parts = [_arrivals_in_process((address, rate, seconds, seed))]
    else:
        with ProcessPoolExecutor(procs) as pool:
            parts = list(pool.map(_arrivals_in_process, [(address, rate / procs, seconds, seed * 100 + i)
                                                         for i in range(procs)]))
    latencies = sorted(x for part in parts for x in part[0])
    elapsed = max(part[2] for part in parts)
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"offered": rate, "throughput": len(latencies) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99),
            "failed": sum(part[1] for part in parts)}


# -- sections ------------------------------------------------------------------------------


def capacity(log_dir: Path, seconds: float) -> float:
    with serving(log_dir, MODEL, "--from-file", str(_weights(log_dir))) as address:
        asyncio.run(closed_loop(address, 32, 1.0))  # warm-up
        result = asyncio.run(closed_loop(address, 32, seconds))
    print(f"capacity of one replica: {result:.0f} requests/s (32 in flight)", flush=True)
    return result


def load_section(log_dir: Path, capacity: float, replicas: list[int], multiples: list[float], seconds: float,
                 procs: int) -> list:
    rows = []
    for n in replicas:
        with serving(log_dir, MODEL, "--from-file", str(_weights(log_dir)), "--replicas", str(n)) as address:
            asyncio.run(closed_loop(address, 64, 2.0))  # warm-up: every replica, every connection
            for m in multiples:
                row = {"replicas": n, "multiple": m, **open_loop(address, m * capacity, seconds, procs=procs)}
                rows.append(row)
                print(f"{n} replicas, offered {row['offered']:.0f}/s: {row['throughput']:.0f}/s answered, "
                      f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms, {row['failed']} failed", flush=True)
    return rows


def routing_section(log_dir: Path, capacity: float, slow_ms: float, seconds: float, multiple: float,
                    procs: int) -> list[dict]:
    env = {"BENCH_SLOW_REPLICA": "0", "BENCH_SLOW_MS": str(slow_ms)}
    rows = []
    for routing in ("least-in-flight", "round-robin"):
        with serving(log_dir, MODEL, "--from-file", str(_weights(log_dir)), "--replicas", "2", "--routing", routing,
                     env=env) as address:
            asyncio.run(closed_loop(address, 8, 1.0))
            row = {"routing": routing, **open_loop(address, multiple * capacity, seconds, seed=1, procs=procs)}
            rows.append(row)
            print(f"{routing}, replica 0 slowed by {slow_ms:g} ms an example: {row['throughput']:.0f}/s of "
                  f"{row['offered']:.0f}/s, p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms", flush=True)
    return rows


def _weights(log_dir: Path) -> Path:
    path = log_dir / "mlp.safetensors"
    if not path.exists():
        from safetensors.torch import save_file
        from benchmarks._serving_model import mlp
        save_file({k: v.contiguous() for k, v in mlp().state_dict().items()}, str(path), metadata={"step": "1"})
    return path


def refresh_section(log_dir: Path, steps: int) -> dict:
    """A worker in this process steps a served job; after each step, how long until an answer
    comes from that step's version."""
    from benchmarks._serving_model import mlp

    lags = []
    with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync") as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {k: v.clone() for k, v in mlp().state_dict().items()}
            worker.register(params, optimizer=ps.optim.SGD(lr=1e-6))
            with serving(log_dir, MODEL, "--from-job", cluster.scheduler, "--refresh-every", "0.05") as address:
                with httpx.Client(timeout=30) as client:
                    for step in range(1, steps + 1):
                        worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(30)
                        done = time.monotonic()
                        while client.post(f"{address}/predict", content=EXAMPLE).json()["version"] < step:
                            time.sleep(0.002)
                        lags.append(time.monotonic() - done)
    result = {"steps": steps, "refresh_every_s": 0.05, "median_ms": 1000 * statistics.median(lags),
              "max_ms": 1000 * max(lags)}
    print(f"refresh lag (--refresh-every 0.05): median {result['median_ms']:.0f} ms, max {result['max_ms']:.0f} ms "
          f"over {steps} steps", flush=True)
    return result


def readers_section(log_dir: Path, steps: int, runs=((0, 0.0), (4, 0.0), (4, 0.5))) -> list[dict]:
    """(readers, seconds between each one's snapshots) of each run."""
    rows = []
    for readers, every in runs:
        with ps.LocalCluster(num_servers=1, num_workers=2, mode="sync") as cluster:
            env = {**child_env(), **cluster.env()}
            outs = [log_dir / f"steps-{readers}-{r}.json" for r in range(2)]
            workers = [spawn(python_module("benchmarks._serving_worker", "train", str(out), str(steps)),
                             {**env, "PS_RANK": str(r)}, cwd=str(ROOT)) for r, out in enumerate(outs)]
            for i in range(readers):
                (log_dir / f"reads-{i}.json").unlink(missing_ok=True)
            reading = [spawn(python_module("benchmarks._serving_worker", "read", str(log_dir / f"reads-{i}.json"),
                                           str(every)), env, cwd=str(ROOT)) for i in range(readers)]
            try:
                for proc in workers:
                    proc.wait(timeout=600)
            finally:
                stop_all(workers + reading)
            times = [t for out in outs for t in json.loads(out.read_text())]
            snapshots = sum(json.loads((log_dir / f"reads-{i}.json").read_text())
                            for i in range(readers) if (log_dir / f"reads-{i}.json").exists())
        rows.append({"readers": readers, "every_s": every, "median_step_ms": 1000 * statistics.median(times),
                     "snapshots": snapshots})
        pace = "back to back" if every == 0 else f"every {every:g} s"
        print(f"{readers} readers ({pace}): median step {rows[-1]['median_step_ms']:.1f} ms ({snapshots} snapshots "
              "taken)", flush=True)
    return rows


def plot(results: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for n in sorted({r["replicas"] for r in results["open_loop"]}):
        rows = [r for r in results["open_loop"] if r["replicas"] == n]
        left.plot([r["offered"] for r in rows], [r["throughput"] for r in rows], "o-", label=f"{n} replicas")
        middle.plot([r["offered"] for r in rows], [r["p99_ms"] for r in rows], "o-", label=f"{n} replicas p99")
    top = max(r["offered"] for r in results["open_loop"])
    left.plot([0, top], [0, top], ":", color="grey", label="offered")
    left.set(xlabel="offered requests/s", ylabel="answered requests/s", title="throughput (open loop)")
    middle.set(xlabel="offered requests/s", ylabel="p99 latency, ms", yscale="log", title="tail latency")
    routing = results["routing"]
    x = range(len(routing))
    right.bar([i - 0.2 for i in x], [r["p50_ms"] for r in routing], 0.4, label="p50")
    right.bar([i + 0.2 for i in x], [r["p99_ms"] for r in routing], 0.4, label="p99")
    right.set_xticks(list(x), [r["routing"] for r in routing])
    right.set(ylabel="latency, ms", yscale="log", title="2 replicas, one slowed")
    for axis in (left, middle, right):
        axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


@click.command()
@click.option("--duration", default=4.0, show_default=True, help="seconds of each open-loop run")
@click.option("--replicas", default="1,2,4", show_default=True)
@click.option("--multiples", default="0.25,0.5,1,1.5,2", show_default=True, help="offered rates, x one replica's capacity")
@click.option("--slow-ms", default=20.0, show_default=True, help="the slowed replica's extra ms per example")
@click.option("--refresh-steps", default=20, show_default=True)
@click.option("--reader-steps", default=150, show_default=True)
@click.option("--routing-load", default=0.6, show_default=True, help="offered rate of the routing runs, x capacity")
@click.option("--load-procs", default=1, show_default=True, help="processes generating the open-loop load")
@click.option("--only", default="load,routing,refresh,readers", show_default=True, help="the sections to run")
@click.option("--quick", is_flag=True, help="a smoke run: short, few points")
@click.option("--out", type=click.Path(), default=str(ROOT / "benchmarks" / "serving.png"), show_default=True)
@click.option("--log-dir", type=click.Path(file_okay=False), default="/tmp/ps-serving-bench", show_default=True)
@click.option("--plot-from", type=click.Path(dir_okay=False, exists=True), help="only plot this results.json")
def main(duration, replicas, multiples, slow_ms, refresh_steps, reader_steps, routing_load, load_procs, only, quick, out,
         log_dir, plot_from):
    if plot_from:
        plot(json.loads(Path(plot_from).read_text()), Path(out))
        return
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    if quick:
        duration, replicas, multiples, refresh_steps, reader_steps = 0.5, "1,2", "0.5", 3, 10
    sections = only.split(",")
    results = {"capacity": capacity(log_dir, duration)}
    if "load" in sections:
        results["open_loop"] = load_section(log_dir, results["capacity"], [int(n) for n in replicas.split(",")],
                                            [float(m) for m in multiples.split(",")], duration, load_procs)
    if "routing" in sections:
        results["routing"] = routing_section(log_dir, results["capacity"], slow_ms, duration, routing_load, load_procs)
    if "refresh" in sections:
        results["refresh"] = refresh_section(log_dir, refresh_steps)
    if "readers" in sections:
        results["readers"] = readers_section(log_dir, reader_steps)
    (log_dir / "results.json").write_text(json.dumps(results, indent=1))
    if not quick and {"load", "routing"} <= set(sections):
        try:
            plot(results, Path(out))
        except ImportError:
            print("no matplotlib here: plot later with --plot-from results.json")
    print(f"results: {log_dir / 'results.json'}")


if __name__ == "__main__":
    main()
