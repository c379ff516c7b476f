"""Child processes of ``pushpull.py``; not meant to be run by hand.

``worker``: one parameter-server worker. It registers one tensor per size, then for every size
times ``push_pull`` round trips; rank 0 also times the baselines' round trips of the same bytes
right next to every PS round trip, so all numbers share the machine's load of that moment. Then
it times as many PS rounds again with nothing between them ("ps_alone"), as gloo's rounds are
timed. One JSON line per size and rank goes to ``--out``.

``echo``: the raw pyzmq baseline's server: a ROUTER that sends every frame straight back.

``minimal``: a hand-written minimal parameter server for one client: every frame is applied
with SGD to its slice of a preallocated parameter buffer, which goes back zero-copy (tracked,
so a slice is not updated while its previous reply is in flight). It has the same process
settings as a psframework server; what it lacks is the protocol, sharding and modes.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import click
import zmq


def _mib_key(mib: int) -> str:
    return f"mib{mib}"


def _minimal_round_trip(sock: zmq.Socket, data: memoryview, frame_bytes: int, into: memoryview) -> float:
    start = time.perf_counter()
    offsets = range(0, len(data), frame_bytes)
    for offset in offsets:
        sock.send(offset.to_bytes(8, "little"), zmq.SNDMORE)  # where it goes in the server's buffer
        sock.send(data[offset:offset + frame_bytes], copy=False)
    for offset in offsets:
        sock.recv_into(into[offset:offset + frame_bytes])
    return time.perf_counter() - start


def _raw_round_trip(sock: zmq.Socket, data: memoryview, frame_bytes: int, into: memoryview | None) -> float:
    """Send ``data`` as frames of ``frame_bytes`` (zero-copy) and receive them back: zero-copy,
    or with ``into`` copied into place there, as a pull must land them in the caller's tensor."""
    start = time.perf_counter()
    offsets = range(0, len(data), frame_bytes)
    for offset in offsets:
        sock.send(data[offset:offset + frame_bytes], copy=False)
    for offset in offsets:
        if into is None:
            sock.recv(copy=False)
        else:
            sock.recv_into(into[offset:offset + frame_bytes])
    return time.perf_counter() - start


_KINDS = ("ps", "raw", "raw_into", "minimal")  # interleaved, round by round
_ORDERS = tuple(_KINDS[i:] + _KINDS[:i] for i in range(len(_KINDS)))  # rotations


@click.group()
def cli() -> None:
    pass


@cli.command()
@click.option("--sizes", required=True, help="MiB, comma-separated")
@click.option("--repeats", type=int, required=True)
@click.option("--warmup", type=int, default=2)
@click.option("--echo", "echo_address", default=None, help="raw zmq echo server (rank 0 uses it)")
@click.option("--minimal", "minimal_address", default=None, help="minimal PS (rank 0 uses it)")
@click.option("--frame-bytes", type=int, default=4 << 20)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def worker(sizes: str, repeats: int, warmup: int, echo_address: str | None, minimal_address: str | None,
           frame_bytes: int, out: str) -> None:
    import torch

    import psframework as ps

    mibs = [int(s) for s in sizes.split(",")]
    params = {_mib_key(m): torch.zeros(m << 18) for m in mibs}  # float32: 2**18 per MiB
    grads = {k: torch.full_like(p, 1e-3) for k, p in params.items()}
    ctx = zmq.Context()
    sockets: dict[str, zmq.Socket] = {}
    try:
        with ps.init() as w:
            w.register(params, optimizer=ps.optim.SGD(lr=0.01))
            if w.rank == 0:
                for name, address in (("echo", echo_address), ("minimal", minimal_address)):
                    if address:
                        sockets[name] = _dealer(ctx, address)
            with open(out, "a") as log:
                for mib in mibs:
                    key = _mib_key(mib)
                    data = memoryview(grads[key].numpy()).cast("B")
                    dest = memoryview(params[key].numpy()).cast("B")
                    times: dict[str, list[float]] = {kind: [] for kind in _KINDS}
                    for r in range(warmup + repeats):
                        # rotate the order so that none of them always runs on a warmer cache
                        for kind in _ORDERS[r % len(_ORDERS)]:
                            # every kind starts together: a PS round must not wait for rank 0's baselines
                            w.barrier()
                            if kind == "ps":
                                start = time.perf_counter()
                                w.push_pull({key: grads[key]}, into={key: params[key]}).wait()
                                elapsed = time.perf_counter() - start
                            elif kind == "minimal" and "minimal" in sockets:
                                elapsed = _minimal_round_trip(sockets["minimal"], data, frame_bytes, dest)
                            elif kind.startswith("raw") and "echo" in sockets:
                                into = dest if kind == "raw_into" else None
                                elapsed = _raw_round_trip(sockets["echo"], data, frame_bytes, into)
                            else:
                                continue
                            if r >= warmup:
                                times[kind].append(elapsed)
                    times["ps_alone"] = _rounds_alone(w, key, grads[key], params[key], warmup, repeats)
                    line = {"rank": w.rank, "mib": mib, "bytes": mib << 20, **times}
                    log.write(json.dumps(line) + "\n")
                    log.flush()
    finally:
        for sock in sockets.values():
            sock.close()
        ctx.term()


def _rounds_alone(w, key: str, grad, param, warmup: int, repeats: int) -> list[float]:
    """PS rounds with nothing between them but the barrier, as gloo's rounds are timed: between
    the interleaved rounds rank 0 runs the baselines while the others wait in the barrier, which
    cost each PS round over a millisecond at 4 MiB (benchmarks/RESULTS.md, issue 20)."""
    times = []
    for r in range(warmup + repeats):
        w.barrier()
        start = time.perf_counter()
        w.push_pull({key: grad}, into={key: param}).wait()
        if r >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _dealer(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def _router(ctx: zmq.Context, address_file: str) -> zmq.Socket:
    """A ROUTER on a free loopback port, announced by writing ``address_file`` atomically."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    tmp = Path(address_file + ".tmp")
    tmp.write_text(f"tcp://127.0.0.1:{port}")
    tmp.rename(address_file)
    return sock


@cli.command()
@click.option("--address-file", type=click.Path(dir_okay=False), required=True)
def echo(address_file: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = _router(ctx, address_file)
    try:
        while True:
            peer, frame = sock.recv_multipart(copy=False)
            sock.send(peer, zmq.SNDMORE, copy=False)
            sock.send(frame, copy=False)
    finally:
        sock.close()
        ctx.term()


@cli.command()
@click.option("--address-file", type=click.Path(dir_okay=False), required=True)
@click.option("--max-bytes", type=int, required=True, help="the largest model")
def minimal(address_file: str, max_bytes: int) -> None:
    import torch

    from psframework.__main__ import _tune_server_process

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _tune_server_process()  # what a psframework server gets: one torch thread, malloc kept
    params = torch.zeros(max_bytes // 4)
    in_flight: dict[int, zmq.MessageTracker] = {}
    ctx = zmq.Context()
    sock = _router(ctx, address_file)
    try:
        while True:
            peer, head, frame = sock.recv_multipart(copy=False)
            offset = int.from_bytes(head.bytes, "little") // 4
            grad = torch.frombuffer(frame, dtype=torch.float32)
            param = params[offset:offset + grad.numel()]
            previous = in_flight.pop(offset, None)
            if previous is not None:
                previous.wait()  # its last reply must have left before it changes
            param.add_(grad, alpha=-0.01)
            sock.send(peer, zmq.SNDMORE, copy=False)
            in_flight[offset] = sock.send(memoryview(param.numpy()).cast("B"), copy=False, track=True)
    finally:
        sock.close()
        ctx.term()


if __name__ == "__main__":
    cli()
