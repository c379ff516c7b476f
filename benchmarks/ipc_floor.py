"""The floor of a push_pull round trip between two processes on one GPU, with no psframework in between.

    python benchmarks/ipc_floor.py --mib 256 --trips 300      # on a GPU machine, about a minute

Issue 14 asks for push_pull of 256 MiB at 500 GB/s (2 x 256 MiB in 1.07 ms) between a worker and
a GPU server on one GPU. This probe measures what two bare processes can do, to say whether the
gap is psframework's or the design's. The worker here holds a gradient ``G`` and a destination
``D``; the server holds the values ``P``; both sides exchange their interprocess events once, and
each round trip is one small ZeroMQ message each way (PAIR over loopback TCP), with the host
waiting for the other side's event between looks (as the device lanes do). Shapes:

- ``messages``: the two messages and nothing else.
- ``worker-copies``: the device lanes' shape. The worker copies ``G`` into a push slot of its own
  memory, records its event and sends; the server waits for that event, steps ``P`` by the slot
  (``P -= lr * slot``), copies ``P`` into a pull slot, records its event and answers; the worker
  waits for it and copies the pull slot into ``D``. Four passes over the tensor, in two contexts.
- ``server-copies``: the worker exports ``G`` and ``D`` themselves. It records its event (the
  gradient is ready) and sends; the server steps ``P`` by ``G`` read where it lies and copies
  ``P`` into ``D``; the worker waits for the server's event. Two passes, all in the server's
  context.

Printed per shape: the median round trip, the fastest, and GB/s as ``benchmarks/gpu.py`` counts
them (2 x tensor bytes / median). Also the device time of each shape's passes in one process
(CUDA events), the floor with no second process and no host in between.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from pathlib import Path

import click
import torch
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/gpu.py is importable
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import median_ms  # noqa: E402

LR = 1e-6
SHAPES = ("messages", "worker-copies", "server-copies")
DEADLINE_S = 60  # for each message and each event: the other process died or hangs


def _wait(event: torch.cuda.Event) -> None:
    """Spin until the other process's event completed (as the device lanes do at first)."""
    started = time.monotonic()
    while not event.query():
        if time.monotonic() - started > DEADLINE_S:
            raise TimeoutError(f"the other process's event did not complete in {DEADLINE_S} s")


def _pair(context: zmq.Context) -> zmq.Socket:
    """A PAIR socket whose receives fail after DEADLINE_S (zmq.Again), never hang."""
    socket = context.socket(zmq.PAIR)
    socket.setsockopt(zmq.RCVTIMEO, DEADLINE_S * 1000)
    return socket


def _server(port: int, inbox, outbox) -> None:
    """The server's process: serve round trips until told to stop."""
    grad, dest, push_slot, pull_slot, their_handle = inbox.get(timeout=120)
    device = grad.device
    values = torch.zeros_like(grad)
    stream = torch.cuda.Stream(device, priority=-1)
    ours = torch.cuda.Event(interprocess=True)
    outbox.put(bytes(ours.ipc_handle()))  # each side records only once the other has opened its event
    theirs = torch.cuda.Event.from_ipc_handle(device, their_handle)
    socket = _pair(zmq.Context.instance())
    socket.connect(f"tcp://127.0.0.1:{port}")
    socket.send(b"ready")
    with torch.cuda.stream(stream):
        while True:
            shape = socket.recv()
            if shape == b"stop":
                break
            if shape != b"messages":
                _wait(theirs)
                source, target = (push_slot, pull_slot) if shape == b"worker-copies" else (grad, dest)
                values.add_(source, alpha=-LR)
                target.copy_(values)
                ours.record(stream)
            socket.send(b"done")
    socket.close(linger=0)


def _round_trips(socket, shape: str, trips: int, grad, dest, push_slot, pull_slot, ours, theirs,
                 stream) -> list[float]:
    seconds = []
    message = shape.encode()
    with torch.cuda.stream(stream):
        for _ in range(trips):
            started = time.perf_counter()
            if shape == "worker-copies":
                push_slot.copy_(grad)
            if shape != "messages":
                ours.record(stream)
            socket.send(message)
            socket.recv()
            if shape != "messages":
                _wait(theirs)
            if shape == "worker-copies":
                dest.copy_(pull_slot)
                stream.synchronize()
            seconds.append(time.perf_counter() - started)
    return seconds


def _device_floor(numel: int, repeats: int) -> dict[str, float]:
    """Milliseconds of each shape's passes in one process, median of ``repeats``."""
    grad, dest, values, push_slot, pull_slot = (torch.randn(numel, device="cuda") for _ in range(5))

    def worker_copies():
        push_slot.copy_(grad)
        values.add_(push_slot, alpha=-LR)
        pull_slot.copy_(values)
        dest.copy_(pull_slot)

    def server_copies():
        values.add_(grad, alpha=-LR)
        dest.copy_(values)

    return {name: median_ms(work, repeats, warmup=3)
            for name, work in (("worker-copies", worker_copies), ("server-copies", server_copies))}


@click.command()
@click.option("--mib", default=256, show_default=True, help="tensor size (float32)")
@click.option("--trips", default=300, show_default=True, help="round trips per shape (after 20 warm-ups)")
@click.option("--rounds", default=2, show_default=True, help="times each shape is run, alternating")
def main(mib: int, trips: int, rounds: int) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("needs a GPU")
    numel = mib * (1 << 20) // 4
    grad, dest, push_slot, pull_slot = (torch.randn(numel, device="cuda") for _ in range(4))
    context = multiprocessing.get_context("spawn")
    to_server, to_worker = context.Queue(), context.Queue()
    socket = _pair(zmq.Context.instance())
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    server = context.Process(target=_server, args=(port, to_server, to_worker), daemon=True)
    server.start()
    try:
        stream = torch.cuda.Stream(priority=-1)
        ours = torch.cuda.Event(interprocess=True)
        to_server.put((grad, dest, push_slot, pull_slot, bytes(ours.ipc_handle())))
        theirs = torch.cuda.Event.from_ipc_handle(grad.device, to_worker.get(timeout=120))
        if not socket.poll(120_000):
            raise click.ClickException("the server process did not start")
        socket.recv()
        results: dict[str, list[float]] = {shape: [] for shape in SHAPES}
        for _ in range(rounds):
            for shape in SHAPES:
                _round_trips(socket, shape, 20, grad, dest, push_slot, pull_slot, ours, theirs, stream)
                results[shape] += _round_trips(socket, shape, trips, grad, dest, push_slot, pull_slot, ours,
                                               theirs, stream)
        socket.send(b"stop")
        server.join(30)
    finally:
        if server.is_alive():
            server.kill()
        socket.close(linger=0)
    print(f"{mib} MiB float32, {rounds} x {trips} round trips per shape, two processes on "
          f"{torch.cuda.get_device_name()}")
    print("| shape | median ms | fastest ms | GB/s (2 x bytes / median) |")
    print("|---|---|---|---|")
    for shape, seconds in results.items():
        median = statistics.median(seconds)
        print(f"| {shape} | {median * 1e3:.3f} | {min(seconds) * 1e3:.3f} | "
              f"{2 * numel * 4 / median / 1e9:.0f} |")
    for shape, ms in _device_floor(numel, 20).items():
        print(f"one process, device time of the {shape} passes: {ms:.3f} ms ({2 * numel * 4 / ms / 1e6:.0f} GB/s)")


if __name__ == "__main__":
    main()
