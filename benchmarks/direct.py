"""The direct exchange against the lanes on one host: ``push_pull`` of host tensors that the server
reads and writes where they lie (made by ``shared_empty``) and of ordinary tensors, which go
through the lane's slots, in the same job, alternating round by round.

    python benchmarks/direct.py                          # 1 KiB, 4 MiB, 64 MiB; ~1 min
    python benchmarks/direct.py --sizes-kib 65536 --repeats 50

One worker (this process) and one CPU server in sync mode with SGD, started by ``LocalCluster``.
Prints the medians in microseconds and their ratio as a Markdown table, and checks the server's
counters: every round of the shared tensors went direct, none of the ordinary ones did.

Then training iterations (``zero_grad``, forward, backward, ``step()``) of an MLP (``--width``, 4
layers: 64 MiB at 2048) with ``DistributedOptimizer`` on the CPU, which keeps the parameters in
shared memory and copies the gradients there at the step, for the servers to read the gradients
and write the values where they lie, against the same job with ``PS_DIRECT=0`` (the gradients
copied into the lanes, the values out of the server's shared values); jobs alternate ``--rounds``
times. The whole iteration is timed: where the gradients go into the servers' memory (in backward
or in the step) is part of what is compared.
"""

from __future__ import annotations

import os
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
            before = 0
            for r in range(warmup + repeats):
                if r == warmup:  # the first round went through the lane while the server was told of the memory
                    before = worker.server_stats()[0]["direct_requests"]
                for shared in (0, 1):
                    took = _round_trip(worker, keys[shared], *pairs[shared])
                    if r >= warmup:
                        times[shared].append(took)
            direct = worker.server_stats()[0]["direct_requests"] - before
            if direct != repeats:
                raise RuntimeError(f"{direct} of {repeats} timed rounds of shared tensors went direct")
            return statistics.median(times[0]), statistics.median(times[1])


def step_ms(direct: bool, width: int, steps: int, warmup: int) -> float:
    """Median ms of a training iteration of the MLP (``zero_grad``, forward, backward, ``step()``), in a
    job of its own."""
    os.environ["PS_DIRECT"] = "1" if direct else "0"  # read by ps.init below
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])
        x = torch.randn(8, width)
        with ps.LocalCluster(num_servers=1, num_workers=1, mode="sync") as cluster:
            with ps.DistributedOptimizer(model, ps.optim.SGD(lr=1e-6), ps.init(scheduler=cluster.scheduler),
                                         overlap=False) as opt:
                times = []
                for i in range(warmup + steps):
                    start = time.perf_counter()
                    opt.zero_grad()
                    model(x).square().mean().backward()
                    opt.step()
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
                went = sum(s["direct_requests"] for s in opt.worker.server_stats())
                if bool(went) != direct:
                    raise RuntimeError(f"{went} direct requests in a job with PS_DIRECT={int(direct)}")
                return statistics.median(times) * 1e3
    finally:
        os.environ.pop("PS_DIRECT", None)


@click.command()
@click.option("--sizes-kib", default="1,4096,65536", help="tensor sizes in KiB, comma-separated")
@click.option("--repeats", type=int, default=40)
@click.option("--warmup", type=click.IntRange(min=1), default=5)
@click.option("--width", type=int, default=2048)
@click.option("--steps", type=int, default=20)
@click.option("--rounds", type=int, default=3)
def main(sizes_kib: str, repeats: int, warmup: int, width: int, steps: int, rounds: int) -> None:
    sizes = [int(s) for s in sizes_kib.split(",")]
    medians = {kib: measure(kib, repeats, warmup) for kib in sizes}
    print(f"medians of {repeats} round trips, microseconds; 1 worker, 1 CPU server, sync SGD, alternating\n")
    print("| KiB | lanes | direct | direct / lanes |")
    print("|---|---|---|---|")
    for kib in sizes:
        lanes, direct = medians[kib]
        print(f"| {kib} | {lanes * 1e6:.0f} | {direct * 1e6:.0f} | {direct / lanes:.2f} |")
    megabytes = 4 * (width * width + width) * 4 / 1e6
    print(f"\nDistributedOptimizer: iterations (zero_grad, forward, backward, step) of a 4-layer MLP of width "
          f"{width} ({megabytes:.0f} MB), SGD, overlap off; median ms of {steps} per job, jobs alternating\n")
    print("| round | through the lanes | where they lie | direct / lanes |")
    print("|---|---|---|---|")
    ratios = []
    for r in range(rounds):
        lanes, direct = step_ms(False, width, steps, warmup), step_ms(True, width, steps, warmup)
        ratios.append(direct / lanes)
        print(f"| {r + 1} | {lanes:.1f} | {direct:.1f} | {direct / lanes:.2f} |")
    print(f"\nmedian ratio {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
