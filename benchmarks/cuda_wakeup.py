"""What a CUDA call costs the host right after the process slept (torch alone, no framework).

    python benchmarks/cuda_wakeup.py            # needs a GPU; about 15 seconds

Each side of a parameter-server round trip sleeps (in a ZeroMQ poll) while the other one works,
then queues device work. This times, on the host, ``torch._fused_sgd_`` of 256 MiB, a 256 MiB and a
64-byte device copy, and a line of pure Python: right after ``torch.cuda.synchronize()``, after
sleeping 1 and 5 ms, and right after a blocking ZeroMQ poll that a timer thread ends after 0.5 ms;
then while another process keeps the GPU busy with copies. Medians of 60 (the minimum too).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time

import torch
import zmq

MiB = 1 << 20
_BUSY = ("import torch, time\nx = torch.randn(64 * 2**20, device='cuda'); y = torch.empty_like(x)\n"
         "end = time.time() + 6\nwhile time.time() < end:\n    y.copy_(x); torch.cuda.synchronize()")


def host_us(fn, sleep: float = 0.0, repeats: int = 60, sync: bool = True) -> str:
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        if sleep:
            time.sleep(sleep)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e6)
    return f"{statistics.median(times):7.1f} us (min {min(times):6.1f})"


def after_poll_us(fn, repeats: int = 60) -> float:
    """Host time of ``fn`` right after a blocking ZeroMQ poll that another thread ends after 0.5 ms."""
    ctx = zmq.Context()
    receiver, sender = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    receiver.bind("inproc://wakeup")
    sender.connect("inproc://wakeup")
    times = []
    try:
        for _ in range(repeats):
            threading.Timer(0.0005, lambda: sender.send(b"x")).start()
            receiver.poll(1000)
            receiver.recv()
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
            torch.cuda.synchronize()
    finally:
        sender.close(linger=0)
        receiver.close(linger=0)
        ctx.term()
    return statistics.median(times)


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("cuda_wakeup.py needs a GPU")
    n = 256 * MiB // 4
    a, b, g = (torch.randn(n, device="cuda") for _ in range(3))
    calls = {
        "fused_sgd 256MiB launch": lambda: torch._fused_sgd_([a], [g], [], weight_decay=0., momentum=0., lr=1e-6,
                                                             dampening=0., nesterov=False, maximize=False,
                                                             is_first_step=False),
        "copy 256MiB launch": lambda: b.copy_(a, non_blocking=True),
        "small copy launch": lambda: b[:16].copy_(a[:16], non_blocking=True),
        "pure python": lambda: sum(range(50)),
    }
    for label, fn in calls.items():
        print(f"{label:26s} idle: {host_us(fn)}  after 1ms sleep: {host_us(fn, 0.001)}  "
              f"after 5ms sleep: {host_us(fn, 0.005)}")
    print("sgd launch, no sync between", host_us(calls["fused_sgd 256MiB launch"], sync=False))
    print("copy launch, no sync between", host_us(calls["copy 256MiB launch"], sync=False))
    sgd = calls["fused_sgd 256MiB launch"]
    print(f"py+sgd launch right after a blocking zmq poll: {after_poll_us(lambda: (sum(range(50)), sgd())):.1f} us")
    busy = subprocess.Popen([sys.executable, "-c", _BUSY])
    try:
        time.sleep(3)
        print("other process busy: sgd launch", host_us(sgd), " copy launch", host_us(calls["copy 256MiB launch"]),
              " small", host_us(calls["small copy launch"]))
    finally:
        try:
            busy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
