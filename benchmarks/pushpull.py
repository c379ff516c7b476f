"""push_pull round trips against raw pyzmq and gloo all_reduce, on loopback.

    python benchmarks/pushpull.py                       # the full sweep (several minutes)
    python benchmarks/pushpull.py --quick               # a smoke run, well under a minute
    python benchmarks/pushpull.py --sizes 64 --servers 1 --workers 1 --repeats 30

For every number of servers S and workers W, a ``LocalCluster`` runs S servers (SGD applied on
the servers, ``--mode`` sync by default) and W worker processes; each worker registers one
float32 tensor per size and times ``push_pull(grads, into=params).wait()`` after a barrier.
A round's time is the slowest worker's; the table shows the median over ``--repeats`` rounds.

The PS talks over loopback TCP like the baselines; ``--shm`` lets it use the shared-memory lanes
that it takes by default between processes of one host (``psframework/datapath/lane.py``).

In the same run, two baselines move the same bytes:

* raw pyzmq: a DEALER (inside worker rank 0, next to every PS round, the order rotating)
  sends the tensor as frames of ``--frame-mib`` with ``copy=False`` to a ROUTER in another
  process, which sends every frame straight back (zero-copy); the client receives them
  zero-copy and touches them no further (``zmq``), or copies them into a destination tensor
  with ``recv_into`` as a pull must (``zmq+copy``). Always one client and one echo process.
* minimal PS: the same client sends the frames to a hand-written minimal parameter server
  (``_pushpull_worker.py minimal``) that applies SGD to each frame's slice of its buffer and
  sends the slice back zero-copy; the client copies it into place. It does the PS's work for
  one worker with none of its protocol, so PS/minimal is what the framework itself costs.
* gloo: ``torch.distributed.all_reduce`` of the same tensor among W processes
  (torch.multiprocessing, init_method tcp://127.0.0.1:PORT), each round after a barrier, with
  nothing else between the rounds. Not run for W = 1, where there is nothing to reduce.

Between the interleaved PS rounds rank 0 runs the two baselines while the other workers wait in
the barrier; the PS rounds pay for that (over a millisecond a round at 4 MiB with 2 workers). So
each worker then times as many PS rounds again the way gloo's are timed, each after a barrier
with nothing between them ("PS alone"), and PS/gloo compares those. The single-client ratios
(PS/zmq, PS/minimal) keep the interleaved rounds.

GB/s, one definition for all three, per worker: 2 x tensor bytes / median round-trip time,
with 1 GB = 1e9 bytes. Each round trip moves the tensor's bytes out (push, send, all_reduce
input) and back (pull, receive, all_reduce result). The ratio columns divide the PS's GB/s
by the baseline's (equal to baseline time / PS time); "PS alone/gloo" is gloo's time over the
PS alone time.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from psframework import LocalCluster  # noqa: E402
from psframework.config import DEFAULT_CHUNK_BYTES  # noqa: E402
from benchmarks._common import child_env, free_port, read_json_lines, tail  # noqa: E402
from psframework.procs import spawn, stop_all  # noqa: E402

CHILD = str(HERE / "_pushpull_worker.py")
DEFAULT_OUT = HERE / "out" / "pushpull.csv"


@dataclass
class Row:
    servers: int
    workers: int
    mode: str
    auth: str
    shm: bool
    size_mib: int
    bytes: int
    repeats: int
    chunk_bytes: int
    ps_median_s: float
    ps_gbps: float
    ps_alone_median_s: float
    ps_alone_gbps: float
    raw_zmq_median_s: float
    raw_zmq_gbps: float
    raw_zmq_copy_median_s: float
    raw_zmq_copy_gbps: float
    minimal_ps_median_s: float
    minimal_ps_gbps: float
    gloo_median_s: Optional[float]
    gloo_gbps: Optional[float]
    ps_over_raw_zmq: float
    ps_over_raw_zmq_copy: float
    ps_over_minimal_ps: float
    ps_over_gloo: Optional[float]


def gbps(nbytes: int, seconds: float) -> float:
    """The one bandwidth definition: bytes out + bytes back, per second, in GB/s (1e9)."""
    return 2 * nbytes / seconds / 1e9


def round_times(per_rank: list[list[float]]) -> list[float]:
    """A round lasts until its slowest worker is done."""
    return [max(ts) for ts in zip(*per_rank)]


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive integers, got {text!r}")
    return values


def _gloo_rank(rank: int, world: int, port: int, mibs: list[int], repeats: int, warmup: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with open(f"{out}.{rank}", "w") as log:
            for mib in mibs:
                tensor = torch.zeros(mib << 18)
                times = []
                for r in range(warmup + repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    dist.all_reduce(tensor)
                    if r >= warmup:
                        times.append(time.perf_counter() - start)
                log.write(json.dumps({"rank": rank, "mib": mib, "times": times}) + "\n")
                log.flush()
    finally:
        dist.destroy_process_group()


def run_gloo(world: int, mibs: list[int], repeats: int, warmup: int, workdir: Path, advance,
             timeout: float) -> tuple[dict[int, float], list[dict]]:
    """Median all_reduce round time per size (MiB) among ``world`` processes, and every round."""
    import torch.multiprocessing as tmp

    out = workdir / f"gloo-{world}"
    context = tmp.start_processes(_gloo_rank, args=(world, free_port(), mibs, repeats, warmup, str(out)),
                                  nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    seen = 0
    try:
        while not context.join(timeout=0.2):
            done = len(read_json_lines(Path(f"{out}.0")))
            advance(done - seen)
            seen = done
            if time.monotonic() > deadline:
                raise click.ClickException(f"gloo all_reduce with {world} processes did not finish in {timeout} s")
    finally:
        for p in context.processes:
            if p.is_alive():
                p.kill()
    advance(len(mibs) - seen)
    lines = [d for r in range(world) for d in read_json_lines(Path(f"{out}.{r}"))]
    per_rank = [{d["mib"]: d["times"] for d in lines if d["rank"] == r} for r in range(world)]
    return {m: statistics.median(round_times([pr[m] for pr in per_rank])) for m in mibs}, lines


# ----------------------------------------------------------------------------- PS + raw zmq


def start_baseline(workdir: Path, kind: str, *args: str) -> tuple[subprocess.Popen, str]:
    """Start the ``echo`` or ``minimal`` server; returns it and its address."""
    address_file = workdir / f"{kind}.address"
    log = workdir / f"{kind}.log"
    with open(log, "wb") as out:
        proc = spawn([sys.executable, CHILD, kind, "--address-file", str(address_file), *args], child_env(),
                     stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not address_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_all([proc])
            raise click.ClickException(f"the {kind} baseline process did not start:\n{tail(log)}")
        time.sleep(0.02)
    return proc, address_file.read_text().strip()


def run_ps(servers: int, workers: int, mode: str, chunk_bytes: Optional[int], auth: str, shm: bool, mibs: list[int],
           repeats: int, warmup: int, baselines: dict[str, str], frame_bytes: int, workdir: Path, advance,
           timeout: float) -> dict[int, dict]:
    """Per size: the PS rounds' median time and rank 0's baseline medians, interleaved with them."""
    tag = f"ps-s{servers}-w{workers}"
    out = workdir / f"{tag}.jsonl"
    procs: list[subprocess.Popen] = []
    logs = []
    seen = 0
    with LocalCluster(num_servers=servers, num_workers=workers, mode=mode, server_device="cpu",
                      chunk_bytes=chunk_bytes, auth=auth) as cluster:
        try:
            for rank in range(workers):
                log = open(workdir / f"{tag}-worker-{rank}.log", "wb")
                logs.append(log)
                argv = [sys.executable, CHILD, "worker", "--sizes", ",".join(map(str, mibs)),
                        "--repeats", str(repeats), "--warmup", str(warmup), "--out", str(out),
                        "--frame-bytes", str(frame_bytes)]
                if rank == 0:
                    argv += ["--echo", baselines["echo"], "--minimal", baselines["minimal"]]
                env = {**child_env(), **cluster.env(), "PS_RANK": str(rank), "PS_SHM": "1" if shm else "0"}
                procs.append(spawn(argv, env, stdout=log, stderr=subprocess.STDOUT))
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p in procs):
                done = sum(1 for d in read_json_lines(out) if d["rank"] == 0)
                advance(done - seen)
                seen = done
                failed = [(r, p.returncode) for r, p in enumerate(procs) if p.poll() not in (None, 0)]
                if failed:
                    rank, code = failed[0]
                    raise click.ClickException(
                        f"{tag}: worker {rank} exited with code {code}:\n{tail(workdir / f'{tag}-worker-{rank}.log')}"
                        f"\n--- server 0:\n{cluster.output('server-0')}")
                if time.monotonic() > deadline:
                    raise click.ClickException(f"{tag}: not finished within {timeout} s:\n"
                                               f"{tail(workdir / f'{tag}-worker-0.log')}")
                time.sleep(0.2)
        finally:
            stop_all(procs)
            for log in logs:
                log.close()
    advance(len(mibs) - seen)
    lines = read_json_lines(out)
    result = {}
    for mib in mibs:
        per_rank = [d["ps"] for d in lines if d["mib"] == mib]
        alone = [d["ps_alone"] for d in lines if d["mib"] == mib]
        raw = [t for d in lines if d["mib"] == mib for t in d["raw"]]
        raw_into = [t for d in lines if d["mib"] == mib for t in d["raw_into"]]
        minimal = [t for d in lines if d["mib"] == mib for t in d["minimal"]]
        if len(per_rank) != workers or not raw or not raw_into or not minimal:
            raise click.ClickException(f"{tag}: incomplete results for {mib} MiB")
        result[mib] = {"ps": statistics.median(round_times(per_rank)),
                       "ps_alone": statistics.median(round_times(alone)), "raw": statistics.median(raw),
                       "raw_into": statistics.median(raw_into), "minimal": statistics.median(minimal),
                       "rounds": [d for d in lines if d["mib"] == mib]}
    return result


# ----------------------------------------------------------------------------- CLI


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def print_table(console: Console, rows: list[Row]) -> None:
    path = "shared-memory lanes" if rows and rows[0].shm else "loopback TCP"
    table = Table(title=f"push_pull (PS over {path}) vs raw pyzmq, a minimal PS and gloo all_reduce (GB/s)",
                  caption="GB/s = 2 x tensor bytes / median round trip, per worker. srv, wkr: PS servers and "
                          "workers (gloo: wkr processes);\nzmq, zmq+copy, minimal: always one client, one server")
    for name in ("srv", "wkr", "MiB", "PS ms", "PS", "PS alone ms", "zmq", "zmq+copy", "minimal", "gloo",
                 "PS/zmq", "PS/zmq+copy", "PS/minimal", "PS alone/gloo"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(str(r.servers), str(r.workers), str(r.size_mib), f"{r.ps_median_s * 1e3:.1f}",
                      f"{r.ps_gbps:.2f}", f"{r.ps_alone_median_s * 1e3:.1f}", f"{r.raw_zmq_gbps:.2f}",
                      f"{r.raw_zmq_copy_gbps:.2f}",
                      f"{r.minimal_ps_gbps:.2f}", _fmt(r.gloo_gbps, ".2f"), f"{r.ps_over_raw_zmq:.2f}",
                      f"{r.ps_over_raw_zmq_copy:.2f}", f"{r.ps_over_minimal_ps:.2f}", _fmt(r.ps_over_gloo, ".2f"))
    console.print(table)


def write_csv(path: Path, rows: list[Row]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sizes", default="1,4,16,64,256", show_default=True, help="Tensor sizes in MiB.")
@click.option("--servers", "servers_list", default="1,2,4", show_default=True)
@click.option("--workers", "workers_list", default="1,2,4", show_default=True)
@click.option("--repeats", type=int, default=10, show_default=True, help="Timed rounds per size.")
@click.option("--warmup", type=int, default=2, show_default=True, help="Untimed rounds first.")
@click.option("--mode", type=click.Choice(["sync", "async", "ssp"]), default="sync", show_default=True)
@click.option("--chunk-mib", type=float, default=None, help="PS chunk size (default: the framework's, 4 MiB).")
@click.option("--auth", type=click.Choice(["none", "token", "curve"]), default="none", show_default=True,
              help="The PS job's security (the raw zmq baseline is always plain).")
@click.option("--shm/--no-shm", default=False, show_default=True,
              help="Let the PS use shared-memory lanes between its processes (the baselines use sockets).")
@click.option("--frame-mib", type=float, default=4.0, show_default=True, help="Raw zmq frame size.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds per configuration.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_OUT, show_default=True)
@click.option("--quick", is_flag=True, help="Sizes 1,4; 1 server; 1 and 2 workers; 3 repeats.")
def main(sizes: str, servers_list: str, workers_list: str, repeats: int, warmup: int, mode: str,
         chunk_mib: Optional[float], auth: str, shm: bool, frame_mib: float, timeout: float, out: Path,
         quick: bool) -> None:
    """Median push_pull round trip of an N MiB model, with raw pyzmq and gloo baselines."""
    if quick:
        sizes, servers_list, workers_list, repeats, warmup = "1,4", "1", "1,2", 3, 1
    mibs, server_counts, worker_counts = _ints(sizes), _ints(servers_list), _ints(workers_list)
    if repeats < 1:
        raise click.BadParameter("--repeats must be >= 1")
    chunk_bytes = int(chunk_mib * 2**20) if chunk_mib else None
    frame_bytes = int(frame_mib * 2**20)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 130))
    gloo_worlds = [w for w in worker_counts if w > 1]
    total = len(mibs) * (len(gloo_worlds) + len(server_counts) * len(worker_counts))
    rows: list[Row] = []
    rounds: list[dict] = []  # every timed round, for the JSON next to the CSV
    with tempfile.TemporaryDirectory(prefix="ps-bench-") as tmp:
        workdir = Path(tmp)
        procs: list[subprocess.Popen] = []
        baselines: dict[str, str] = {}
        try:
            for kind, args in (("echo", ()), ("minimal", ("--max-bytes", str(max(mibs) << 20)))):
                proc, baselines[kind] = start_baseline(workdir, kind, *args)
                procs.append(proc)
            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), console=console) as progress:
                task = progress.add_task("starting", total=total)

                def advance(n: int) -> None:
                    if n > 0:
                        progress.advance(task, n)

                gloo: dict[int, dict[int, float]] = {}
                gloo_rounds: list[dict] = []
                for world in gloo_worlds:
                    progress.update(task, description=f"gloo all_reduce, {world} processes")
                    gloo[world], lines = run_gloo(world, mibs, repeats, warmup, workdir, advance, timeout)
                    gloo_rounds += [{"workers": world, **d} for d in lines]
                for servers in server_counts:
                    for workers in worker_counts:
                        progress.update(task, description=f"PS {servers} server(s), {workers} worker(s)")
                        ps = run_ps(servers, workers, mode, chunk_bytes, auth, shm, mibs, repeats, warmup,
                                    baselines, frame_bytes, workdir, advance, timeout)
                        for mib in mibs:
                            nbytes = mib << 20
                            t_ps, t_raw, t_into, t_min = (ps[mib][k] for k in ("ps", "raw", "raw_into", "minimal"))
                            t_alone = ps[mib]["ps_alone"]
                            rounds.append({"servers": servers, "workers": workers, "mib": mib,
                                           "per_rank": ps[mib]["rounds"]})
                            t_gloo = gloo.get(workers, {}).get(mib)
                            rows.append(Row(
                                servers=servers, workers=workers, mode=mode, auth=auth, shm=shm, size_mib=mib,
                                bytes=nbytes,
                                repeats=repeats, chunk_bytes=chunk_bytes or DEFAULT_CHUNK_BYTES,
                                ps_median_s=t_ps, ps_gbps=gbps(nbytes, t_ps),
                                ps_alone_median_s=t_alone, ps_alone_gbps=gbps(nbytes, t_alone),
                                raw_zmq_median_s=t_raw, raw_zmq_gbps=gbps(nbytes, t_raw),
                                raw_zmq_copy_median_s=t_into, raw_zmq_copy_gbps=gbps(nbytes, t_into),
                                minimal_ps_median_s=t_min, minimal_ps_gbps=gbps(nbytes, t_min),
                                gloo_median_s=t_gloo, gloo_gbps=gbps(nbytes, t_gloo) if t_gloo else None,
                                ps_over_raw_zmq=t_raw / t_ps, ps_over_raw_zmq_copy=t_into / t_ps,
                                ps_over_minimal_ps=t_min / t_ps,
                                ps_over_gloo=t_gloo / t_alone if t_gloo else None,
                            ))
        finally:
            stop_all(procs)
    print_table(console, rows)
    write_csv(out, rows)
    rounds_path = out.with_suffix(".rounds.json")
    rounds_path.write_text(json.dumps({"gloo": gloo_rounds, "ps_and_zmq": rounds}))
    console.print(f"wrote {out} and every round's times to {rounds_path}")


if __name__ == "__main__":
    main()
