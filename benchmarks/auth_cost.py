"""What authentication costs: push_pull round trips with --auth none, token and curve, in one run.

    python benchmarks/auth_cost.py --sizes 4,64 --repeats 7

One worker (this process), one server (a LocalCluster child), SGD on the server. Prints the median
round trip and GB/s (2 x model bytes / round trip) per mechanism and the ratio to ``none``.
"""

from __future__ import annotations

import statistics
import time

import click


def _median_round_trip(auth: str, mib: int, repeats: int) -> float:
    import torch

    import psframework as ps

    with ps.LocalCluster(num_servers=1, num_workers=1, mode="async", auth=auth) as cluster:
        with ps.init(scheduler=cluster.scheduler, secret_file=cluster.config.secret_file) as worker:
            params = {"w": torch.zeros(mib * 2**20 // 4)}
            grads = {"w": torch.full_like(params["w"], 1e-6)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            times = []
            for i in range(repeats + 2):
                start = time.perf_counter()
                worker.push_pull(grads, into=params).wait(timeout=120)
                if i >= 2:  # warm-up: first-touch of buffers on both sides
                    times.append(time.perf_counter() - start)
            return statistics.median(times)


@click.command()
@click.option("--sizes", default="4,64", show_default=True, help="model sizes in MiB")
@click.option("--repeats", default=7, show_default=True)
def main(sizes: str, repeats: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="authentication cost: push_pull, 1 worker, 1 server, loopback")
    for column in ("MiB", "mechanism", "median ms", "GB/s", "vs none"):
        table.add_column(column)
    for mib in (int(s) for s in sizes.split(",")):
        base = None
        for auth in ("none", "token", "curve"):
            seconds = _median_round_trip(auth, mib, repeats)
            base = base or seconds
            table.add_row(str(mib), auth, f"{seconds * 1e3:.1f}", f"{2 * mib / 1024 / seconds:.2f}",
                          f"{base / seconds:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
