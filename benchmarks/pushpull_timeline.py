"""Where one push_pull round trip goes: round-trip times, then the job's trace of the last few.

    python benchmarks/pushpull_timeline.py --mib 256                  # GPU tensors, a GPU server
    python benchmarks/pushpull_timeline.py --mib 256 --chunk-mib 256  # the same as one block
    python benchmarks/pushpull_timeline.py --mib 16 --device cpu --show 1   # a smoke run

One worker (this process) and one server of a ``LocalCluster``, both on ``--device``, time
``push_pull(grads, into=params).wait()`` of one float32 tensor of ``--mib`` MiB (SGD on the
server), with ``torch.cuda.synchronize()`` after each on a GPU, so the worker's copies out are
included: the median and the fastest of ``--rounds`` after five warm-ups, and GB/s = 2 x tensor
bytes / median, as ``gpu.py --only pushpull``. On a GPU the tensor goes through the device lane
(CUDA IPC) unless ``PS_CUDA_IPC=0``.

With ``--show N`` (default 3) the rounds are traced (``PS_TRACE_DIR``, ``psframework/trace.py``)
and the events of the last N exchanges are printed in time order, in microseconds from the start
of each exchange: the worker's exchange, its request to the server and its wait, and the server's
handling of each block's request, its optimizer step, its answer and the answer's wait for the
device. Tracing costs a few microseconds an event, so the traced rounds are timed apart.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/gpu.py is importable
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import psframework as ps  # noqa: E402
from benchmarks.gpu import MiB, round_trip_times  # noqa: E402
from psframework.trace import merge  # noqa: E402


def _round_trips(mib: int, chunk_mib: int, device: str, rounds: int, trace_dir=None) -> list[float]:
    with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync", server_device=device,
                         chunk_bytes=chunk_mib * MiB if chunk_mib else None, trace_dir=trace_dir) as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            worker.register({f"t{mib}": torch.zeros(mib * MiB // 4, device=device)}, optimizer=ps.optim.SGD(lr=1e-6))
            return round_trip_times(worker, mib, device, rounds, warmup=5)


def _timeline(trace_dir: str, show: int) -> list[str]:
    path, _ = merge(trace_dir)
    events = json.loads(Path(path).read_text())["traceEvents"]
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("name") == "process_name"}
    timed = sorted((e for e in events if e.get("ph") == "X"), key=lambda e: e["ts"])
    lines = []
    for exchange in [e for e in timed if e.get("cat") == "exchange"][-show:]:
        start, end = exchange["ts"], exchange["ts"] + exchange["dur"]
        lines.append(f"exchange of {exchange['dur']:.0f} us   (start us, duration us, process, event)")
        for e in timed:
            if start <= e["ts"] <= end:
                lines.append(f"  {e['ts'] - start:7.0f} {e['dur']:6.0f}  {names.get(e['pid'], e['pid']):<10} {e['name']}")
    return lines


@click.command()
@click.option("--mib", default=256, show_default=True, help="the tensor's size")
@click.option("--chunk-mib", default=0, help="blocks of this size (default: PS_CHUNK_BYTES's)")
@click.option("--device", default="cuda", show_default=True, type=click.Choice(["cuda", "cpu"]))
@click.option("--rounds", default=25, show_default=True, help="timed round trips")
@click.option("--show", default=3, show_default=True, help="exchanges whose trace to print (0: no trace)")
def main(mib: int, chunk_mib: int, device: str, rounds: int, show: int) -> None:
    times = _round_trips(mib, chunk_mib, device, rounds)
    median = statistics.median(times)
    blocks = f"blocks of {chunk_mib} MiB" if chunk_mib else "default blocks"
    click.echo(f"{mib} MiB on {device}, {blocks}: median {median * 1e3:.3f} ms "
               f"({2 * mib * MiB / median / 1e9:.1f} GB/s), fastest {min(times) * 1e3:.3f} ms, {rounds} rounds")
    if show <= 0:
        return
    with tempfile.TemporaryDirectory(prefix="ps-timeline-") as trace_dir:
        os.environ["PS_TRACE_DIR"] = trace_dir  # the worker (this process) reads it at ps.init
        try:
            _round_trips(mib, chunk_mib, device, show + 2, trace_dir)
        finally:
            os.environ.pop("PS_TRACE_DIR")
        click.echo("\n".join(_timeline(trace_dir, show)))


if __name__ == "__main__":
    main()
