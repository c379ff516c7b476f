"""The direct exchange against the lanes on one host: ``push_pull`` of host tensors that the server
reads and writes where they lie (made by ``shared_empty``) and of ordinary tensors, which go
through the lane's slots, in the same job, alternating round by round.

    python benchmarks/direct.py                          # 1 KiB, 4 MiB, 64 MiB; ~1 min
    python benchmarks/direct.py --sizes-kib 65536 --repeats 50

One worker (this process) and one CPU server in sync mode with SGD, started by ``LocalCluster``.
Prints the medians in microseconds and their ratio as a Markdown table, and checks the server's
counters: every round of the shared tensors went direct, none of the ordinary ones did.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

import psframework as ps


def _round_trip(worker, key: str, grad: torch.Tensor, param: torch.Tensor) -> float:
    start = time.perf_counter()
    worker.push_pull({key: grad}, into={key: param}).wait(timeout=60)
    return time.perf_counter() - start


def _pair(worker, numel: int, shared: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A gradient and a parameter of ``numel`` floats: in shared memory, or ordinary tensors."""
    if not shared:
        return torch.randn(numel), torch.zeros(numel)
    grad, param = (worker.lanes.direct.shared_empty(numel, torch.float32) for _ in range(2))
    grad.copy_(torch.randn(numel))
    return grad, param


def measure(kib: int, repeats: int, warmup: int) -> tuple[float, float]:
    """Medians (seconds) of lane and direct round trips of one size, in a job of their own (blocks
    of that size: a tensor packed with another into one block would not be exchanged whole);
    checks that each took its path."""
    with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=kib * 1024) as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            keys = {shared: f"{'direct' if shared else 'lane'}{kib}" for shared in (0, 1)}
            worker.register({key: torch.zeros(kib * 256) for key in keys.values()}, optimizer=ps.optim.SGD(lr=1e-6))
            if any(len(block.segments) > 1 for block in worker.shard_map.blocks):
                raise RuntimeError(f"the {kib} KiB tensors were packed into one block")
            pairs = {shared: _pair(worker, kib * 256, bool(shared)) for shared in (0, 1)}
            times: dict[int, list[float]] = {0: [], 1: []}
            for r in range(warmup + repeats):
                for shared in (0, 1):
                    took = _round_trip(worker, keys[shared], *pairs[shared])
                    if r >= warmup:
                        times[shared].append(took)
            direct = worker.server_stats()[0]["direct_requests"]
            if direct != warmup + repeats:
                raise RuntimeError(f"{direct} of {warmup + repeats} rounds of shared tensors went direct")
            return statistics.median(times[0]), statistics.median(times[1])


@click.command()
@click.option("--sizes-kib", default="1,4096,65536", help="tensor sizes in KiB, comma-separated")
@click.option("--repeats", type=int, default=40)
@click.option("--warmup", type=int, default=5)
def main(sizes_kib: str, repeats: int, warmup: int) -> None:
    sizes = [int(s) for s in sizes_kib.split(",")]
    medians = {kib: measure(kib, repeats, warmup) for kib in sizes}
    print(f"medians of {repeats} round trips, microseconds; 1 worker, 1 CPU server, sync SGD, alternating\n")
    print("| KiB | lanes | direct | direct / lanes |")
    print("|---|---|---|---|")
    for kib in sizes:
        lanes, direct = medians[kib]
        print(f"| {kib} | {lanes * 1e6:.0f} | {direct * 1e6:.0f} | {direct / lanes:.2f} |")


if __name__ == "__main__":
    main()
