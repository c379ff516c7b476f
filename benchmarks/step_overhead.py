"""The worker's own host time per ``DistributedOptimizer.step()`` for a model of many tensors,
against torch.optim's ``step()`` in the same process (issue 14).

    python benchmarks/step_overhead.py                  # a GPT-like model of 101 small tensors, ~30 s
    python benchmarks/step_overhead.py --layers 2 --steps 40

A launch-bound model (the GPT of ``benchmarks/gpu.py``: ~20 ms of Python per step driving ~10 ms of
GPU) is slowed by every millisecond of Python the worker spends per step, and that grows with the
number of tensors, not their size. So the model here is the GPT-like one of ``_one_gpu.py`` made
tiny (width 32, 500 tokens), on the CPU, and what is timed is the step alone, after backward: its
wall time, and the CPU time of the calling thread (the worker's own Python and copies, not the
server's or ZeroMQ's threads). One server on the CPU, one worker (this process), sync, lanes as the
job's default, with overlap off and on (with overlap the hooks do their work during backward,
so the last column, backward and ``step()`` together, is the one to compare). The baseline is
``torch.optim.Adam(foreach=True).step()`` of the same model. Prints medians of ``--steps``
timed steps as a Markdown table, then the time ``FlatViews.stage`` takes for every gradient of
the model (the per-tensor part of a GPU model's ``step()``).
"""

from __future__ import annotations

import copy
import statistics
import time
import timeit

import click
import torch

import psframework as ps
from _one_gpu import GPT
from psframework.sharding import TensorSpec, assign_shards
from psframework.worker.flat import FlatViews


def _timed_steps(model: torch.nn.Module, step, steps: int, warmup: int) -> tuple[float, float, float]:
    """Median wall ms and calling-thread CPU ms of ``step()`` after a forward and backward, and
    median wall ms of backward and ``step()`` together (where overlap's hooks do their work)."""
    tokens = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(0))
    wall, cpu, both = [], [], []
    for i in range(warmup + steps):
        for p in model.parameters():
            p.grad = None
        loss = model(tokens).float().sum()
        backward_started = time.perf_counter()
        loss.backward()
        started, thread_started = time.perf_counter(), time.thread_time()
        step()
        if i >= warmup:
            ended = time.perf_counter()
            wall.append(ended - started)
            cpu.append(time.thread_time() - thread_started)
            both.append(ended - backward_started)
    return statistics.median(wall) * 1e3, statistics.median(cpu) * 1e3, statistics.median(both) * 1e3


def _ps_row(model: torch.nn.Module, overlap: bool, steps: int, warmup: int) -> tuple[float, float, float]:
    with ps.LocalCluster(num_servers=1, num_workers=1) as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            with ps.DistributedOptimizer(model, ps.optim.Adam(lr=1e-3), worker=worker, overlap=overlap) as opt:
                return _timed_steps(model, opt.step, steps, warmup)


def _stage_us(model: torch.nn.Module) -> tuple[float, float]:
    """Best-of-seven microseconds of ``FlatViews.stage`` of every gradient of (a copy of) ``model``,
    laid out in one block, and of its one fused copy alone: the per-tensor Python staging costs."""
    params = dict(copy.deepcopy(model).named_parameters())
    specs = [TensorSpec(name, tuple(p.shape), "float32") for name, p in params.items()]
    views = FlatViews(params, assign_shards(specs, 1, 1 << 30).blocks, whole=True)
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    into, sources = [views.grad_view(name) for name in grads], list(grads.values())

    def best_us(call) -> float:
        return min(timeit.repeat(call, number=200, repeat=7)) / 200 * 1e6
    with torch.no_grad():
        return best_us(lambda: views.stage(grads)), best_us(lambda: torch._foreach_copy_(into, sources))


@click.command()
@click.option("--layers", type=int, default=8, help="transformer layers (12 tensors each, 5 more around them)")
@click.option("--steps", type=int, default=300)
@click.option("--warmup", type=int, default=20)
def main(layers: int, steps: int, warmup: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = GPT(vocab=500, width=32, layers=layers, heads=4, context=16)
    tensors = len(list(model.parameters()))
    baseline = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    rows = [("torch.optim.Adam, one process", *_timed_steps(model, baseline.step, steps, warmup))]
    for overlap in (False, True):
        label = f"ps.DistributedOptimizer, sync, 1 server, overlap {'on' if overlap else 'off'}"
        rows.append((label, *_ps_row(model, overlap, steps, warmup)))
    print(f"{tensors} tensors, {sum(p.numel() for p in model.parameters())} parameters; medians of {steps} steps\n")
    print("| step() of | wall ms | calling thread's CPU ms | CPU vs torch.optim | backward + step() wall ms | vs torch.optim |")
    print("|---|---|---|---|---|---|")
    for label, wall, cpu, both in rows:
        print(f"| {label} | {wall:.3f} | {cpu:.3f} | {cpu / rows[0][2]:.1f}x | {both:.3f} | {both / rows[0][3]:.2f}x |")
    staged, copied = _stage_us(model)
    print(f"\nFlatViews.stage of the {tensors} gradients: {staged:.0f} us, of which its fused copy {copied:.0f} us")


if __name__ == "__main__":
    main()
