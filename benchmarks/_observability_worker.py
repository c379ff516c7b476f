"""A worker under ps-launch for benchmarks/observability.py: times push_pull of one tensor.

    ps-launch -n 1 -s 1 --server-device cpu -- python benchmarks/_observability_worker.py OUT --mib 64
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch

import psframework as ps


@click.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--mib", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
def main(out: str, mib: int, repeats: int, warmup: int) -> None:
    numel = (mib << 20) // 4
    with ps.init() as worker:
        params = {"w": torch.zeros(numel)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1e-6))
        grads = {"w": torch.ones(numel)}
        times = []
        for i in range(warmup + repeats):
            start = time.perf_counter()
            worker.push_pull(grads, into=params).wait(timeout=60)
            if i >= warmup:
                times.append(time.perf_counter() - start)
        worker.barrier()
    with open(out, "w") as f:
        json.dump({"median_s": statistics.median(times), "times": times}, f)


if __name__ == "__main__":
    main()
