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


def _raw_round_trip(sock: zmq.Socket, data: memoryview, frame_bytes: int) -> float:
    """Send ``data`` as frames of ``frame_bytes`` (zero-copy), receive them back (zero-copy)."""
    start = time.perf_counter()
    count = 0
    for offset in range(0, len(data), frame_bytes):
        sock.send(data[offset:offset + frame_bytes], copy=False)
        count += 1
    for _ in range(count):
        sock.recv(copy=False)
    return time.perf_counter() - start


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
                    ps_times, raw_times = [], []
                    for r in range(warmup + repeats):
                        w.barrier()
                        # alternate the order so that neither side always runs on a warmer cache
                        if sock is not None and r % 2:
                            raw = _raw_round_trip(sock, data, frame_bytes)
                        start = time.perf_counter()
                        w.push_pull({key: grads[key]}, into={key: params[key]}).wait()
                        elapsed = time.perf_counter() - start
                        if sock is not None and not r % 2:
                            raw = _raw_round_trip(sock, data, frame_bytes)
                        if r >= warmup:
                            ps_times.append(elapsed)
                            if sock is not None:
                                raw_times.append(raw)
                    line = {"rank": w.rank, "mib": mib, "bytes": mib << 20, "ps": ps_times, "raw": raw_times}
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
