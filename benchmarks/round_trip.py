"""What a request costs beyond its bytes: ``push_pull`` round trips of small tensors against raw
pyzmq round trips of the same bytes, in the same run.

    python benchmarks/round_trip.py                          # 1 KiB, 64 KiB, 4 MiB; ~30 s
    python benchmarks/round_trip.py --sizes-kib 1 --repeats 50

One worker (this process) and one CPU server in sync mode with SGD, started by ``LocalCluster``;
the PS is timed through the shared-memory lanes it takes by default on one host, and over loopback
TCP (``PS_SHM=0``). The baseline is a DEALER in this process and the ``echo`` ROUTER of
``_pushpull_worker.py`` in another, which sends every message straight back (zero-copy both ways):
the least any round trip between two processes over ZeroMQ costs. Rounds of each kind alternate,
so all share the machine's load of that moment. Prints the medians in microseconds as a Markdown
table; "PS - zmq" is what the framework adds to a round trip (two Python processes' work on the
request and its answer: protocol, bookkeeping, the optimizer's call, the copies).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import click
import torch
import zmq

import psframework as ps

HERE = Path(__file__).resolve().parent


def _start_echo(stack: ExitStack) -> str:
    """The echo ROUTER in a child process (stopped when ``stack`` closes); returns its address."""
    address_file = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "echo.address"
    child = subprocess.Popen([sys.executable, str(HERE / "_pushpull_worker.py"), "echo",
                              "--address-file", str(address_file)])
    stack.callback(lambda: (child.terminate(), child.wait(timeout=10)))
    deadline = time.monotonic() + 30
    while not address_file.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the echo process did not start (exit status {child.poll()})")
        time.sleep(0.01)
    return address_file.read_text()


def _echo_round_trip(sock: zmq.Socket, payload: torch.Tensor) -> float:
    start = time.perf_counter()
    sock.send(memoryview(payload.numpy()), copy=False)
    sock.recv(copy=False)
    return time.perf_counter() - start


def _ps_round_trip(worker, key: str, grad: torch.Tensor, param: torch.Tensor) -> float:
    start = time.perf_counter()
    worker.push_pull({key: grad}, into={key: param}).wait(timeout=60)
    return time.perf_counter() - start


def _measure(sizes_kib: list[int], repeats: int, warmup: int, lanes: bool, echo: zmq.Socket) -> dict:
    """Medians (seconds) of PS and raw zmq round trips by size, alternating round by round."""
    os.environ["PS_SHM"] = "1" if lanes else "0"  # read by ps.init below
    try:
        with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync") as cluster:
            with ps.init(scheduler=cluster.scheduler) as worker:
                worker.register({f"t{kib}": torch.zeros(kib * 256) for kib in sizes_kib},
                                optimizer=ps.optim.SGD(lr=1e-6))
                medians = {}
                for kib in sizes_kib:
                    grad, param = torch.randn(kib * 256), torch.zeros(kib * 256)
                    ps_times, zmq_times = [], []
                    for r in range(warmup + repeats):
                        ps_s = _ps_round_trip(worker, f"t{kib}", grad, param)
                        zmq_s = _echo_round_trip(echo, grad)
                        if r >= warmup:
                            ps_times.append(ps_s)
                            zmq_times.append(zmq_s)
                    medians[kib] = (statistics.median(ps_times), statistics.median(zmq_times))
                return medians
    finally:
        os.environ.pop("PS_SHM", None)


@click.command()
@click.option("--sizes-kib", default="1,64,4096", help="tensor sizes in KiB, comma-separated")
@click.option("--repeats", type=int, default=200)
@click.option("--warmup", type=int, default=20)
def main(sizes_kib: str, repeats: int, warmup: int) -> None:
    sizes = [int(s) for s in sizes_kib.split(",")]
    with ExitStack() as stack:
        ctx = zmq.Context()
        stack.callback(ctx.term)
        echo = ctx.socket(zmq.DEALER)
        echo.setsockopt(zmq.LINGER, 0)
        stack.callback(echo.close)
        echo.connect(_start_echo(stack))
        through_lanes = _measure(sizes, repeats, warmup, True, echo)
        over_tcp = _measure(sizes, repeats, warmup, False, echo)
    print(f"medians of {repeats} round trips, microseconds; zmq: raw pyzmq, the same bytes, "
          "alternating with the PS's rounds\n")
    print("| KiB | zmq (lanes run) | PS, lanes | PS - zmq | zmq (TCP run) | PS, TCP | PS - zmq |")
    print("|---|---|---|---|---|---|---|")
    for kib in sizes:
        (lane_ps, lane_zmq), (tcp_ps, tcp_zmq) = through_lanes[kib], over_tcp[kib]
        print(f"| {kib} | {lane_zmq * 1e6:.0f} | {lane_ps * 1e6:.0f} | {(lane_ps - lane_zmq) * 1e6:.0f} | "
              f"{tcp_zmq * 1e6:.0f} | {tcp_ps * 1e6:.0f} | {(tcp_ps - tcp_zmq) * 1e6:.0f} |")


if __name__ == "__main__":
    main()
