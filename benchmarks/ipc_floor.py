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
- ``worker-gpu-waits``: ``worker-copies`` ordered by flags in pinned host memory shared by both
  processes (``psframework/datapath/memops.py``) instead of events: the worker's stream writes the
  round trip's number into the push flag after its copy, the server's host reads it there and
  queues its work and a write of the pull flag, and answers; the worker's stream, not its host,
  waits for the pull flag before its copy out.
- ``both-gpu-waits``: the same, but the server's stream waits for the push flag too, so neither
  host waits for the other's device work.

Before the shapes, the probe checks that a stream waiting for a flag nobody writes is released by
an ordinary store from the host (what a process does when the one that should write it died).

Printed per shape: the median round trip, the fastest, and GB/s as ``benchmarks/gpu.py`` counts
them (2 x tensor bytes / median). Also the device time of each shape's passes in one process
(CUDA events), the floor with no second process and no host in between.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import multiprocessing
import statistics
from multiprocessing import shared_memory
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import click
import numpy as np
import torch
import zmq

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/gpu.py is importable
    sys.path.insert(0, str(ROOT))

from benchmarks.gpu import median_ms  # noqa: E402
from psframework.datapath.memops import memops  # noqa: E402

LR = 1e-6
SHAPES = ("messages", "worker-copies", "server-copies", "worker-gpu-waits", "both-gpu-waits")
PUSH_FLAG, PULL_FLAG = 0, 16  # int32 offsets in the shared flags
DEADLINE_S = 60  # for each message and each event: the other process died or hangs


GPU_WAITS = ("worker-gpu-waits", "both-gpu-waits")
RELEASE_FLAG = 32  # int32 offset of the flag the release check waits for
FLAGS_BYTES = 4096


class Flags:
    """Flags (int32) in shared memory, pinned and mapped for the device in each process."""

    def __init__(self, name: Optional[str] = None):
        self.memory = shared_memory.SharedMemory(name=name, create=name is None, size=FLAGS_BYTES)
        self.host = np.ndarray((FLAGS_BYTES // 4,), dtype=np.int32, buffer=self.memory.buf)
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(self.memory.buf))
        self.device = memops().register(self._address, FLAGS_BYTES)

    def at(self, offset: int) -> int:
        """The device address of the flag at ``offset``."""
        return self.device + 4 * offset

    def wait_on_host(self, offset: int, value: int) -> None:
        started = time.monotonic()
        while int(self.host[offset]) < value:
            if time.monotonic() - started > DEADLINE_S:
                raise TimeoutError(f"flag {offset} did not reach {value} in {DEADLINE_S} s")

    def close(self, unlink: bool) -> None:
        memops().unregister(self._address)
        del self.host
        self.memory.close()
        if unlink:
            self.memory.unlink()


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
    grad, dest, push_slot, pull_slot, their_handle, flags_name = inbox.get(timeout=120)
    device = grad.device
    values = torch.zeros_like(grad)
    stream = torch.cuda.Stream(device, priority=-1)
    ours = torch.cuda.Event(interprocess=True)
    outbox.put(bytes(ours.ipc_handle()))  # each side records only once the other has opened its event
    theirs = torch.cuda.Event.from_ipc_handle(device, their_handle)
    flags = Flags(flags_name)
    socket = _pair(zmq.Context.instance())
    socket.connect(f"tcp://127.0.0.1:{port}")
    socket.send(b"ready")
    with torch.cuda.stream(stream):
        while True:
            shape, _, number = socket.recv().decode().partition(" ")
            if shape == "stop":
                break
            if shape in GPU_WAITS:
                if shape == "both-gpu-waits":
                    memops().wait(stream.cuda_stream, flags.at(PUSH_FLAG), int(number))
                else:
                    flags.wait_on_host(PUSH_FLAG, int(number))
                values.add_(push_slot, alpha=-LR)
                pull_slot.copy_(values)
                memops().write(stream.cuda_stream, flags.at(PULL_FLAG), int(number))
            elif shape != "messages":
                _wait(theirs)
                source, target = (push_slot, pull_slot) if shape == "worker-copies" else (grad, dest)
                values.add_(source, alpha=-LR)
                target.copy_(values)
                ours.record(stream)
            socket.send(b"done")
    socket.close(linger=0)
    flags.close(unlink=False)


def _round_trips(socket, shape: str, trips: int, *, grad, dest, push_slot, pull_slot, ours, theirs,
                 stream, flags: Flags, numbers: Iterator[int]) -> list[float]:
    seconds = []
    with torch.cuda.stream(stream):
        for _ in range(trips):
            started = time.perf_counter()
            if shape in GPU_WAITS:
                number = next(numbers)
                push_slot.copy_(grad)
                memops().write(stream.cuda_stream, flags.at(PUSH_FLAG), number)
                socket.send(f"{shape} {number}".encode())
                socket.recv()
                memops().wait(stream.cuda_stream, flags.at(PULL_FLAG), number)
                dest.copy_(pull_slot)
                stream.synchronize()
                seconds.append(time.perf_counter() - started)
                continue
            if shape == "worker-copies":
                push_slot.copy_(grad)
            if shape != "messages":
                ours.record(stream)
            socket.send(shape.encode())
            socket.recv()
            if shape != "messages":
                _wait(theirs)
            if shape == "worker-copies":
                dest.copy_(pull_slot)
                stream.synchronize()
            seconds.append(time.perf_counter() - started)
    return seconds


def _released_by_host(flags: Flags) -> tuple[bool, float]:
    """Queue a wait for a flag nobody writes: whether the stream still waits after 0.2 s, and the
    seconds until it goes on once the host stores the value."""
    stream = torch.cuda.Stream()
    value = int(flags.host[RELEASE_FLAG]) + 1
    memops().wait(stream.cuda_stream, flags.at(RELEASE_FLAG), value)
    passed = torch.cuda.Event()
    passed.record(stream)
    time.sleep(0.2)
    waiting = not passed.query()
    started = time.perf_counter()
    flags.host[RELEASE_FLAG] = value
    while not passed.query():
        if time.perf_counter() - started > DEADLINE_S:
            raise TimeoutError("a stream waiting for a flag was not released by the host's store")
    return waiting, time.perf_counter() - started


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
    flags = Flags()
    waiting, released_s = _released_by_host(flags)
    context = multiprocessing.get_context("spawn")
    to_server, to_worker = context.Queue(), context.Queue()
    socket = _pair(zmq.Context.instance())
    port = socket.bind_to_random_port("tcp://127.0.0.1")
    server = context.Process(target=_server, args=(port, to_server, to_worker), daemon=True)
    server.start()
    try:
        stream = torch.cuda.Stream(priority=-1)
        ours = torch.cuda.Event(interprocess=True)
        to_server.put((grad, dest, push_slot, pull_slot, bytes(ours.ipc_handle()), flags.memory.name))
        theirs = torch.cuda.Event.from_ipc_handle(grad.device, to_worker.get(timeout=120))
        if not socket.poll(120_000):
            raise click.ClickException("the server process did not start")
        socket.recv()
        results: dict[str, list[float]] = {shape: [] for shape in SHAPES}
        numbers = itertools.count(1)
        for _ in range(rounds):
            for shape in SHAPES:
                trip = functools.partial(_round_trips, socket, shape, grad=grad, dest=dest, push_slot=push_slot,
                                         pull_slot=pull_slot, ours=ours, theirs=theirs, stream=stream,
                                         flags=flags, numbers=numbers)
                trip(20)
                results[shape] += trip(trips)
        socket.send(b"stop")
        server.join(30)
    finally:
        if server.is_alive():
            server.kill()
        socket.close(linger=0)
        flags.close(unlink=True)
    print(f"a stream waiting for a flag nobody writes: still waiting after 0.2 s: {waiting}; "
          f"released {released_s * 1e6:.0f} us after the host stored the value")
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
