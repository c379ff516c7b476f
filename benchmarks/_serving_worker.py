"""Processes of benchmarks/serving.py's readers section, under a LocalCluster's PS_* variables.

    python -m benchmarks._serving_worker train OUT STEPS   # a worker: its step times (s) to OUT
    python -m benchmarks._serving_worker read OUT EVERY    # a reader: snapshots until the job ends
"""

from __future__ import annotations

import json
import sys
import time

import torch

import psframework as ps

TENSORS = {"embedding": (4096, 256), "hidden": (1024, 1024), "out": (1024, 16)}  # 8.1 MB of float32
WARMUP = 10


def train(out: str, steps: int) -> None:
    with ps.init() as worker:
        params = {name: torch.zeros(shape) for name, shape in TENSORS.items()}
        worker.register(params, optimizer=ps.optim.SGD(lr=0.01))
        grads = {name: torch.randn(shape) for name, shape in TENSORS.items()}
        times = []
        for _ in range(steps + WARMUP):
            started = time.perf_counter()
            worker.push_pull(grads, into=params).wait(timeout=60)
            times.append(time.perf_counter() - started)
        with open(out, "w") as f:
            json.dump(times[WARMUP:], f)


def read(out: str, every: float) -> None:
    """Snapshots of every tensor, ``every`` seconds apart (0: back to back)."""
    dest = {name: torch.empty(shape) for name, shape in TENSORS.items()}
    snapshots = 0
    with ps.Reader(timeout=60) as reader:  # welcomed once the workers registered
        try:
            while True:
                time.sleep(every)
                reader.snapshot(dest)
                snapshots += 1
                with open(out, "w") as f:
                    json.dump(snapshots, f)
        except ps.PSError:
            pass  # the job is over


if __name__ == "__main__":
    if sys.argv[1] == "train":
        train(sys.argv[2], int(sys.argv[3]))
    else:
        read(sys.argv[2], float(sys.argv[3]))
