"""Both processes' GPU timelines over a few push_pull round trips: where the device waits.

    python benchmarks/pushpull_profile.py --mib 256                    # on a GPU machine, under a minute
    python benchmarks/pushpull_profile.py --mib 256 --device-ordered   # push_pull(..., device_ordered=True)
    python benchmarks/pushpull_profile.py --mib 1 --device cpu --trips 2   # a smoke run: no GPU spans

One worker (this process) and one server of a ``LocalCluster``, both on ``--device``, run
``push_pull(grads, into=params).wait()`` of one float32 tensor of ``--mib`` MiB (SGD on the
server), each round trip ending after ``torch.cuda.synchronize()``. After warm-ups, ``--trips``
round trips run under ``torch.profiler`` (CPU and CUDA activity) in both processes: the server is
started through this script (``--serve``), which profiles ``python -m psframework server`` and writes
its trace when it exits. Both traces use the host's clock, so their events line up.

Printed per profiled round trip, in us from its start: the worker's GPU spans (its copies), the
server's first kernel launch and its GPU spans (its step and copy), and the two waits that no
host causes: from the server's launch to its first kernel, and from the server's last GPU work
to the worker's next (with one GPU and no MPS, each is the device switching between the two
processes' contexts). ``--out DIR`` keeps both traces (chrome://tracing or ui.perfetto.dev).
The sixteenth round of RESULTS_GPU.md has what a 256 MiB round trip looked like on an H200.
"""

from __future__ import annotations

import gzip
import json
import os
import runpy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/gpu.py is importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import psframework as ps  # noqa: E402
import psframework.cluster as cluster_module  # noqa: E402
from benchmarks.gpu import MiB  # noqa: E402

ACTIVITIES = [torch.profiler.ProfilerActivity.CPU] + (
    [torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
TRIP = "round trip"


def serve(trace_path: str, server_args: list[str]) -> None:
    """The server's process: ``python -m psframework server ...`` under the profiler."""
    sys.argv = ["psframework", *server_args]
    profiler = torch.profiler.profile(activities=ACTIVITIES)
    profiler.start()
    try:
        runpy.run_module("psframework", run_name="__main__")
    finally:
        profiler.stop()
        profiler.export_chrome_trace(trace_path)


def _profiled_servers(trace_path: str):
    """``cluster.python_module`` for a LocalCluster whose server runs under ``serve``."""
    plain = cluster_module.python_module

    def python_module(module: str, *args: str) -> list[str]:
        if args and args[0] == "server":
            return [sys.executable, str(Path(__file__).resolve()), "--serve", trace_path, *args]
        return plain(module, *args)
    return python_module


def run_trips(mib: int, device: str, trips: int, device_ordered: bool, trace_dir: str) -> list[float]:
    """Warm-ups, then ``trips`` profiled round trips; both traces land in ``trace_dir``."""
    plain = cluster_module.python_module
    cluster_module.python_module = _profiled_servers(os.path.join(trace_dir, "server.json"))
    try:
        return _profiled_trips(mib, device, trips, device_ordered, trace_dir)
    finally:
        cluster_module.python_module = plain


def _profiled_trips(mib: int, device: str, trips: int, device_ordered: bool, trace_dir: str) -> list[float]:
    n = mib * MiB // 4
    with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync", server_device=device) as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            worker.register({"t": torch.zeros(n, device=device)}, optimizer=ps.optim.SGD(lr=1e-6))
            params, grads = torch.zeros(n, device=device), torch.randn(n, device=device)

            def trip() -> None:
                worker.push_pull({"t": grads}, into={"t": params}, device_ordered=device_ordered).wait(timeout=60)
                if device == "cuda":
                    torch.cuda.synchronize()
            for _ in range(10):
                trip()
            times = []
            with torch.profiler.profile(activities=ACTIVITIES) as profiler:
                for _ in range(trips):
                    start = time.perf_counter()
                    with torch.profiler.record_function(TRIP):
                        trip()
                    times.append(time.perf_counter() - start)
            profiler.export_chrome_trace(os.path.join(trace_dir, "worker.json"))
        cluster.wait(60)  # the server's trace is written as it exits
    return times


def _events(path: str) -> list[dict]:
    return [e for e in json.loads(Path(path).read_text())["traceEvents"] if e.get("ph") == "X"]


def _spans(events: list[dict], start: float, end: float) -> list[tuple[float, float]]:
    return sorted((e["ts"] - start, e["ts"] - start + e["dur"]) for e in events
                  if e.get("cat") in GPU_CATEGORIES and start <= e["ts"] <= end)


def describe(worker_events: list[dict], server_events: list[dict]) -> list[str]:
    """One line per profiled round trip (see the module's docstring)."""
    lines = []
    for trip in [e for e in worker_events if e["name"] == TRIP and e.get("cat") == "user_annotation"]:
        start, end = trip["ts"], trip["ts"] + trip["dur"]
        mine, theirs = _spans(worker_events, start, end), _spans(server_events, start, end)
        launches = sorted(e["ts"] - start for e in server_events
                          if e["name"] == "cudaLaunchKernel" and start <= e["ts"] <= end)
        line = f"round trip {trip['dur']:6.0f} us: worker GPU {_show(mine)}; server GPU {_show(theirs)}"
        if launches and theirs:
            later = [a for a, _ in mine if a >= theirs[-1][1]]
            line += (f"; server launch {launches[0]:.0f} -> its first kernel {theirs[0][0] - launches[0]:.0f} us later"
                     + (f"; server's last GPU work -> worker's next {later[0] - theirs[-1][1]:.0f} us" if later else "")
                     + f"; GPU busy {sum(b - a for a, b in mine + theirs):.0f} us")
        lines.append(line)
    return lines


def _show(spans: list[tuple[float, float]]) -> str:
    if not spans:
        return "-"
    return f"{spans[0][0]:.0f}-{spans[-1][1]:.0f} ({len(spans)} ops, {sum(b - a for a, b in spans):.0f} us busy)"


@click.command()
@click.option("--mib", default=256, show_default=True, help="the tensor's size")
@click.option("--device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu"]))
@click.option("--trips", default=5, show_default=True, help="profiled round trips")
@click.option("--device-ordered", is_flag=True, help="push_pull(..., device_ordered=True)")
@click.option("--out", default=None, help="keep both traces (gzipped) in this folder")
def main(mib: int, device: str, trips: int, device_ordered: bool, out) -> None:
    with tempfile.TemporaryDirectory(prefix="ps-profile-") as trace_dir:
        times = run_trips(mib, device, trips, device_ordered, trace_dir)
        click.echo(f"{mib} MiB on {device}{', device-ordered' if device_ordered else ''}: {trips} profiled round "
                   f"trips, median {statistics.median(times) * 1e3:.3f} ms (the profiler adds to it)")
        paths = {name: os.path.join(trace_dir, f"{name}.json") for name in ("worker", "server")}
        click.echo("\n".join(describe(_events(paths["worker"]), _events(paths["server"]))))
        if out:
            os.makedirs(out, exist_ok=True)
            for name, path in paths.items():
                with open(path, "rb") as source, gzip.open(os.path.join(out, f"{name}.json.gz"), "wb") as target:
                    target.write(source.read())


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        serve(sys.argv[2], sys.argv[3:])
    else:
        main()
