"""What a GPU-side wait on another process's interprocess CUDA event does once that process is killed.

    python benchmarks/ipc_event_death.py              # on a GPU machine, about 35 s

The device lanes (``psframework/datapath/cuda_ipc.py``) order a worker's and a server's device work
by each other's interprocess events, and wait for them on the host, checking between looks that the
peer lives. A GPU-side wait (``stream.wait_event``) would cost no host round trip, so this probe
says why it is not used: a producer process records an event behind about ten seconds of device
work and exports it; this process opens it and makes a stream wait for it; then the producer is
killed. Printed: whether the event and the waiting stream's own event ever complete within
``--seconds``, and whether a wait queued after the death does. On an H200 (driver of December
2026) none did: a stream made to wait for a dead process's event is stuck for good, and its
process with it (``benchmarks/RESULTS_GPU.md``, thirteenth round).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import click
import torch


def _producer(handles, go) -> None:
    stream = torch.cuda.Stream()
    event = torch.cuda.Event(interprocess=True)
    with torch.cuda.stream(stream):
        torch.cuda._sleep(int(2e10))  # about ten seconds of spinning on the GPU
        event.record(stream)
    handles.put(event.ipc_handle())
    go.wait()
    time.sleep(600)  # until killed


def _completes(event: torch.cuda.Event, seconds: float) -> float | None:
    """Seconds until ``event`` completed, or None if it did not within ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if event.query():
            return time.monotonic() - started
        time.sleep(0.01)
    return None


@click.command()
@click.option("--seconds", default=30.0, show_default=True, help="how long to watch after the kill")
def main(seconds: float) -> None:
    if not torch.cuda.is_available():
        raise click.ClickException("needs a GPU")
    context = multiprocessing.get_context("spawn")
    handles, go = context.Queue(), context.Event()
    producer = context.Process(target=_producer, args=(handles, go), daemon=True)
    producer.start()
    try:
        theirs = torch.cuda.Event.from_ipc_handle(torch.device("cuda", 0), handles.get(timeout=120))
        stream, ours = torch.cuda.Stream(), torch.cuda.Event()
        stream.wait_event(theirs)
        ours.record(stream)
        click.echo(f"before the kill: their event done {theirs.query()}, the waiting stream's {ours.query()}")
        go.set()
        time.sleep(0.5)
        os.kill(producer.pid, signal.SIGKILL)
        producer.join(10)
        waited = _completes(ours, seconds)
        click.echo(f"after the kill: the waiting stream's event "
                   f"{'completed after %.2f s' % waited if waited is not None else f'not done in {seconds:.0f} s'}; "
                   f"their event done {theirs.query()}")
        later_stream, later = torch.cuda.Stream(), torch.cuda.Event()
        later_stream.wait_event(theirs)
        later.record(later_stream)
        click.echo(f"a wait queued after the death: done within 2 s {_completes(later, 2.0) is not None}")
    finally:
        producer.kill()
        producer.join(10)
    os._exit(0)  # the stuck streams would hold the interpreter's exit (torch synchronizes at teardown)


if __name__ == "__main__":
    main()
