"""Child processes of ``pushpull.py``; not meant to be run by hand.

``worker``: one parameter-server worker. It registers one tensor per size, then for every size
times ``push_pull`` round trips; rank 0 also times a raw pyzmq round trip of the same bytes
against the ``echo`` process right next to every PS round trip, so the two numbers share the
machine's load of that moment. One JSON line per size and rank goes to ``--out``.

``echo``: the raw pyzmq baseline's server: a ROUTER that sends every frame straight back.
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


_ORDERS = (("ps", "raw", "raw_into"), ("raw", "raw_into", "ps"), ("raw_into", "ps", "raw"))


@click.group()
def cli() -> None:
    pass


@cli.command()
@click.option("--sizes", required=True, help="MiB, comma-separated")
@click.option("--repeats", type=int, required=True)
@click.option("--warmup", type=int, default=2)
@click.option("--echo", "echo_address", default=None, help="raw zmq echo server (rank 0 uses it)")
@click.option("--frame-bytes", type=int, default=4 << 20)
@click.option("--out", type=click.Path(dir_okay=False), required=True)
def worker(sizes: str, repeats: int, warmup: int, echo_address: str | None, frame_bytes: int, out: str) -> None:
    import torch

    import psframework as ps

    mibs = [int(s) for s in sizes.split(",")]
    params = {_mib_key(m): torch.zeros(m << 18) for m in mibs}  # float32: 2**18 per MiB
    grads = {k: torch.full_like(p, 1e-3) for k, p in params.items()}
    ctx = sock = None
    with ps.init() as w:
        w.register(params, optimizer=ps.optim.SGD(lr=0.01))
        if w.rank == 0 and echo_address:
            ctx = zmq.Context()
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.setsockopt(zmq.RCVHWM, 0)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(echo_address)
        try:
            with open(out, "a") as log:
                for mib in mibs:
                    key = _mib_key(mib)
                    data = memoryview(grads[key].numpy()).cast("B")
                    dest = memoryview(params[key].numpy()).cast("B")
                    times: dict[str, list[float]] = {"ps": [], "raw": [], "raw_into": []}
                    for r in range(warmup + repeats):
                        w.barrier()
                        # rotate the order so that none of the three always runs on a warmer cache
                        round_times = {}
                        for what in _ORDERS[r % len(_ORDERS)]:
                            if what == "ps":
                                start = time.perf_counter()
                                w.push_pull({key: grads[key]}, into={key: params[key]}).wait()
                                round_times["ps"] = time.perf_counter() - start
                            elif sock is not None:
                                into = dest if what == "raw_into" else None
                                round_times[what] = _raw_round_trip(sock, data, frame_bytes, into)
                        if r >= warmup:
                            for what, t in round_times.items():
                                times[what].append(t)
                    line = {"rank": w.rank, "mib": mib, "bytes": mib << 20, **times}
                    log.write(json.dumps(line) + "\n")
                    log.flush()
        finally:
            if sock is not None:
                sock.close()
                ctx.term()


@cli.command()
@click.option("--address-file", type=click.Path(dir_okay=False), required=True)
def echo(address_file: str) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        tmp = Path(address_file + ".tmp")
        tmp.write_text(f"tcp://127.0.0.1:{port}")
        tmp.rename(address_file)
        while True:
            peer, frame = sock.recv_multipart(copy=False)
            sock.send(peer, zmq.SNDMORE, copy=False)
            sock.send(frame, copy=False)
    finally:
        sock.close()
        ctx.term()


if __name__ == "__main__":
    cli()
