"""Gradient compression on slow links: bytes per step, step time and time to accuracy per codec.

    .venv/bin/python benchmarks/compression.py                 # as root: the full run (RESULTS.md)
    .venv/bin/python benchmarks/compression.py --quick         # a smoke run, a minute or two

Four virtual hosts (network namespaces off one bridge, as ``tests/integration/netns.py`` builds
them for the multi-host tests): the scheduler and worker 0 on host 0, worker 1 on host 1, server 0
on host 2 and server 1 on host 3, so every push and pull crosses a link (``PS_SHM=0``: the
namespaces share memory, and the servers would otherwise map the workers' lanes). Each host's link is
limited with ``tc ... tbf`` on both ends of its veth pair to ``--rates`` (e.g. 1gbit, 10gbit): each
direction of each host's link at that rate, like a host with one NIC on a switch. ``10gbit@0.2ms``
also delays each packet by 0.2 ms each way, with ``netem``, which the 2-vCPU machine's kernel lacks
(see /work/shared/notes/slow-links.md).

For each codec, one sync job: 2 workers train an MLP of 2.2 million parameters on scikit-learn's
handwritten digits (``benchmarks/_compression_worker.py``) with ``ps.DistributedOptimizer`` and
the codec (pulls are exact unless the codec's row says ``+bf16 pulls`` or ``+int8 pulls``).
Measured: bytes per step
(the pushes as the servers received them, ``server_stats()["push_bytes"]``, per worker per step;
and everything the workers' links carried both ways, from the hosts' interface counters, TCP and
headers included, per worker per step), the median step time, time to ``--target-acc`` held-out
accuracy (rank 0 copies its weights every ``--eval-every-steps`` steps and evaluates the copies
after the run: the step and the wall time at which the first copy reached it), final accuracy, and
each one's ratio to no compression; with ``--repeats N`` each codec runs N times (in rounds over the
codecs) and the table shows medians, with every run's time to the target. A PNG of held-out
accuracy over wall time, one panel per rate. Outputs go under ``--out-dir``, rewritten after every
job. No ssh is needed: the jobs start inside the namespaces with ``ip netns exec``.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import child_env, tail  # noqa: E402
from psframework.procs import spawn, stop_all  # noqa: E402
from tests.integration import netns as vnet  # noqa: E402

CODECS = {  # name -> (compression, pull_compression), as Python expressions of ps
    "none": ("None", "None"),
    "fp16": ("ps.compress.FP16()", "None"),
    "int8": ("ps.compress.Int8()", "None"),
    "onebit": ("ps.compress.OneBit()", "None"),
    "topk0.01": ("ps.compress.TopK(0.01)", "None"),
    "int8+bf16 pulls": ("ps.compress.Int8()", "ps.compress.BF16()"),
    "topk0.01+bf16 pulls": ("ps.compress.TopK(0.01)", "ps.compress.BF16()"),
    "int8+int8 pulls": ("ps.compress.Int8()", "ps.compress.Int8()"),
    "topk0.01+int8 pulls": ("ps.compress.TopK(0.01)", "ps.compress.Int8()"),
}
WORKER_HOSTS, SERVER_HOSTS = (0, 1), (2, 3)


def limit_links(cluster, rate: str) -> None:
    """``tbf`` at ``rate`` on both ends of every host's veth pair (each direction of each link); a rate
    written ``RATE@DELAY`` (``10gbit@0.2ms``) puts the tbf under a ``netem`` that delays each packet."""
    rate, _, delay = rate.partition("@")
    tbf = ["tbf", "rate", rate, "burst", "256kb", "latency", "20ms"]
    shapes = ([["root", "handle", "1:", "netem", "delay", delay], ["parent", "1:1", "handle", "10:", *tbf]]
              if delay else [["root", *tbf]])
    for i, host in enumerate(cluster.hosts):
        for where, dev in ((host, "eth0"), (None, f"{vnet.PREFIX}v{i}-{cluster.cluster_id}")):
            _tc(cluster, where, ["qdisc", "del", "dev", dev, "root"], check=False)  # the last rate's
            for shape in shapes:
                _tc(cluster, where, ["qdisc", "add", "dev", dev, *shape])


def _tc(cluster, host, args: list[str], check: bool = True) -> None:
    """``tc args`` in ``host``'s namespace (None: outside, on the bridge's side)."""
    argv = ["tc", *args]
    done = (subprocess.run(argv, capture_output=True, text=True) if host is None
            else cluster.run_in(host, argv, capture_output=True, text=True))
    if check and done.returncode:
        raise click.ClickException(f"{' '.join(argv)} failed: {done.stderr.strip()} (a delay needs the "
                                   "kernel's netem, sch_netem)")


def link_bytes(cluster, host) -> int:
    """Bytes the host's link carried so far, both directions (``/proc/net/dev`` of its eth0)."""
    out = cluster.run_in(host, ["cat", "/proc/net/dev"], capture_output=True, text=True, check=True).stdout
    fields = next(line for line in out.splitlines() if line.strip().startswith("eth0:")).split(":")[1].split()
    return int(fields[0]) + int(fields[8])


def run_job(cluster, codec: str, options: dict, out: Path) -> dict:
    """One sync job with this codec; the workers' records and the links' bytes."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "scheduler.address", *out.glob("worker-*.json")]:  # of an earlier run
        stale.unlink(missing_ok=True)
    compression, pull = CODECS[codec]
    procs, logs = [], []

    def start(host_index: int, name: str, argv: list, env: dict):
        host = cluster.hosts[host_index]
        log = open(out / f"{name}.log", "wb")
        logs.append(log)
        # the namespaces share one file system and memory: without PS_SHM=0 the servers would map the
        # workers' shared-memory lanes as if they were on the same host
        env = {**child_env(), "PS_BIND": host.address, "PS_HOST": name, "PS_SHM": "0", **env}
        procs.append(spawn(["ip", "netns", "exec", host.name, *argv], env, stdout=log, stderr=subprocess.STDOUT))

    try:
        address_file = out / "scheduler.address"
        start(0, "scheduler", [sys.executable, "-m", "psframework", "scheduler", "--address-file", str(address_file)],
              {"PS_NUM_WORKERS": "2", "PS_NUM_SERVERS": str(len(SERVER_HOSTS)), "PS_MODE": "sync",
               "PS_SERVER_DEVICE": "cpu"})
        scheduler = _wait_for(address_file, procs[0], out / "scheduler.log")
        for rank, host in enumerate(SERVER_HOSTS):
            start(host, f"server-{rank}", [sys.executable, "-m", "psframework", "server", "--rank", str(rank)],
                  {"PS_SCHEDULER": scheduler})
        before = sum(link_bytes(cluster, cluster.hosts[h]) for h in WORKER_HOSTS)
        worker_options = json.dumps({**options, "codec": compression, "pull": pull})
        for rank, host in enumerate(WORKER_HOSTS):
            start(host, f"worker-{rank}", [sys.executable, str(HERE / "_compression_worker.py"), str(out),
                                           worker_options], {"PS_SCHEDULER": scheduler, "PS_RANK": str(rank)})
        for rank, proc in enumerate(procs[-2:]):
            if proc.wait(timeout=options["timeout_s"]) != 0:
                raise click.ClickException(f"{codec}: worker {rank} failed:\n{tail(out / f'worker-{rank}.log')}")
        wire = sum(link_bytes(cluster, cluster.hosts[h]) for h in WORKER_HOSTS) - before
    finally:
        stop_all(procs)
        for log in logs:
            log.close()
    records = [json.loads((out / f"worker-{r}.json").read_text()) for r in range(2)]
    return {"records": records, "wire_bytes": wire}


def _wait_for(path: Path, proc, log: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        if proc.poll() is not None:
            raise click.ClickException(f"the scheduler exited:\n{tail(log)}")
        time.sleep(0.05)
    raise click.ClickException("the scheduler did not start listening")


def summarize(codec: str, jobs: list[dict], target: float) -> dict:
    """One codec's row: medians over its repeated jobs (and each job's own figures)."""
    runs = [_one_run(job, target) for job in jobs]
    reached = [r["time_to_target_s"] for r in runs]
    row = {key: statistics.median(r[key] for r in runs)
           for key in ("push_bytes_per_step", "wire_bytes_per_step", "step_ms", "wall_s", "final_acc")}
    # a median over the runs that reached the target, if most did
    enough = sum(t is not None for t in reached) * 2 > len(reached)
    return {**row, "codec": codec, "runs": runs, "curve": runs[0]["curve"], "params": runs[0]["params"],
            "time_to_target_s": statistics.median(t for t in reached if t is not None) if enough else None,
            "steps_to_target": statistics.median(r["steps_to_target"] for r in runs
                                                 if r["steps_to_target"] is not None) if enough else None}


def _one_run(job: dict, target: float) -> dict:
    rank0 = job["records"][0]
    steps = rank0["steps"]
    push_bytes = sum(s["push_bytes"] for s in rank0["stats"])
    curve = rank0["curve"]
    first = next(((t, step) for t, step, acc in curve if acc >= target), (None, None))
    return {"push_bytes_per_step": push_bytes / (2 * steps), "wire_bytes_per_step": job["wire_bytes"] / (2 * steps),
            "step_ms": 1000 * statistics.median(t for r in job["records"] for t in r["step_times"][5:]),
            "wall_s": max(r["wall_s"] for r in job["records"]), "time_to_target_s": first[0],
            "steps_to_target": first[1], "final_acc": curve[-1][2], "curve": curve, "params": rank0["params"]}


def report(rate: str, rows: list[dict], target: float) -> str:
    base = next((r for r in rows if r["codec"] == "none"), rows[0])

    def ratio(value, of, invert=False):
        if value is None or of is None or not value:
            return "-"
        return f"{(of / value) if not invert else (value / of):.1f}x"

    lines = [f"| codec ({rate}) | push B/step | x fewer | link B/step (both ways) | x fewer | step ms | "
             f"steps to {target:.2f} | time to {target:.2f} s (each run) | x faster | final acc |", "|" + " --- |" * 10]
    for r in rows:
        tt, steps_to = r["time_to_target_s"], r["steps_to_target"]
        each = ", ".join("-" if run["time_to_target_s"] is None else f"{run['time_to_target_s']:.1f}"
                         for run in r["runs"])
        lines.append(f"| {r['codec']} | {r['push_bytes_per_step'] / 1e6:.2f} MB | "
                     f"{ratio(r['push_bytes_per_step'], base['push_bytes_per_step'])} | "
                     f"{r['wire_bytes_per_step'] / 1e6:.2f} MB | "
                     f"{ratio(r['wire_bytes_per_step'], base['wire_bytes_per_step'])} | "
                     f"{r['step_ms']:.0f} | {'-' if steps_to is None else f'{steps_to:.0f}'} | "
                     f"{'not reached' if tt is None else f'{tt:.1f}'} ({each}) | "
                     f"{ratio(tt, base['time_to_target_s'])} | {r['final_acc']:.4f} |")
    return "\n".join(lines)


def plot(results: dict, path: Path, target: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (rate, rows) in zip(axes[0], results.items()):
        for r in rows:
            ax.plot([t for t, _, _ in r["curve"]], [a for _, _, a in r["curve"]], label=r["codec"], marker=".")
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_title(f"links at {rate}: 2 workers, 2 servers, 4 hosts")
        ax.set_xlabel("wall time (s)")
        ax.set_ylabel("held-out accuracy")
        ax.set_ylim(0.5, 1.0)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@click.command()
@click.option("--rates", default="1gbit,10gbit", help="link rates (tc tbf syntax), comma-separated; RATE@DELAY "
              "(10gbit@0.2ms) also delays each packet (needs the kernel's netem)")
@click.option("--codecs", default=",".join(CODECS), help="codecs to run, comma-separated (see CODECS)")
@click.option("--steps", default=300, help="steps per worker")
@click.option("--batch", default=64)
@click.option("--lr", default=0.02)
@click.option("--target-acc", default=0.95)
@click.option("--eval-every-steps", default=2, help="rank 0 keeps a copy of its weights every this many steps")
@click.option("--repeats", default=1, help="jobs per codec (in rounds over the codecs); the table shows medians")
@click.option("--out-dir", default=str(HERE / "out" / "compression"))
@click.option("--quick", is_flag=True, help="a smoke run: 1gbit, none and topk0.01, 40 steps")
def main(rates, codecs, steps, batch, lr, target_acc, eval_every_steps, repeats, out_dir, quick):
    reason = vnet.netns_unavailable_reason(ssh=False)
    if reason:
        raise click.ClickException(f"needs network namespaces (run as root): {reason}")
    if quick:
        rates, codecs, steps = "1gbit", "none,topk0.01", 40
    unknown = [c for c in codecs.split(",") if c not in CODECS]
    if unknown:
        raise click.ClickException(f"unknown codecs {unknown}; choose from {', '.join(CODECS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    options = {"steps": steps, "batch": batch, "lr": lr, "eval_every_steps": eval_every_steps, "timeout_s": 900}
    results: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp, vnet.virtual_cluster(4, Path(tmp), ssh=False) as cluster:
        for rate in rates.split(","):
            limit_links(cluster, rate)
            jobs: dict[str, list] = {codec: [] for codec in codecs.split(",")}
            for round_ in range(repeats):
                for codec, done in jobs.items():
                    name = codec.replace(" ", "_").replace("+", "_")
                    done.append(run_job(cluster, codec, options, out / rate / f"{name}-{round_}"))
                    run = _one_run(done[-1], target_acc)
                    click.echo(f"{rate} {codec} (run {round_ + 1}/{repeats}): {run['push_bytes_per_step'] / 1e6:.2f} "
                               f"MB pushed/step, {run['step_ms']:.0f} ms/step, {run['steps_to_target']} steps and "
                               f"{run['time_to_target_s']} s to {target_acc}, final acc {run['final_acc']:.4f}")
                    # what is done so far, in case the run is cut short
                    results[rate] = [summarize(codec, done, target_acc) for codec, done in jobs.items() if done]
                    tables = save(results, out, target_acc)
    plot(results, out / "compression.png", target_acc)
    click.echo(tables)


def save(results: dict, out: Path, target: float) -> str:
    (out / "results.json").write_text(json.dumps(results, indent=1))
    tables = "\n\n".join(report(rate, rows, target) for rate, rows in results.items())
    (out / "results.md").write_text(tables + "\n")
    return tables


if __name__ == "__main__":
    main()
