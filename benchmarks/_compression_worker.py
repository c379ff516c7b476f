"""One worker of benchmarks/compression.py: ``python benchmarks/_compression_worker.py OUT_DIR JSON``.

Trains an MLP of about 2.2 million parameters on scikit-learn's digits (its shard of a stratified
75/25 split) with ``ps.DistributedOptimizer`` and the codec given; rank 0 keeps a copy of the weights
every ``eval_every_steps`` steps and evaluates the copies on the held-out part after training, so
evaluation costs the run no time. Writes ``OUT_DIR/worker-RANK.json``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

import psframework as ps


def digits(rank: int, workers: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    x_train, x_test = as_x(x_train), as_x(x_test)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    return x_train[rank::workers], y_train[rank::workers], x_test, y_test


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 2048), torch.nn.ReLU(), torch.nn.Linear(2048, 1024),
                               torch.nn.ReLU(), torch.nn.Linear(1024, 10))


def main(out_dir: str, options: dict) -> None:
    torch.set_num_threads(1)
    codec = eval(options["codec"], {"ps": ps})
    pull = eval(options["pull"], {"ps": ps})
    net = model()
    opt = ps.DistributedOptimizer(net, ps.optim.SGD(lr=options["lr"], momentum=0.9), compression=codec,
                                  pull_compression=pull)
    worker = opt.worker
    x, y, x_test, y_test = digits(worker.rank, worker.num_workers)
    g = torch.Generator().manual_seed(worker.rank)
    steps, every = options["steps"], options["eval_every_steps"]
    # rank 0 copies its weights every ``every`` steps into rows allocated (and touched) before the
    # clock starts: a copy costs about a millisecond, a fresh allocation's page faults several
    snapshots = Snapshots(net, 1 + steps // every if worker.rank == 0 else 0)
    step_times = []
    worker.barrier()
    start = time.perf_counter()
    snapshots.take(net, 0.0, 0)
    for step in range(steps):
        began = time.perf_counter()
        batch = torch.randint(0, len(x), (options["batch"],), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        opt.step()
        now = time.perf_counter()
        step_times.append(now - began)
        if (step + 1) % every == 0:
            snapshots.take(net, now - start, step + 1)
    worker.barrier()
    wall = time.perf_counter() - start
    record = {"rank": worker.rank, "wall_s": wall, "steps": steps, "step_times": step_times}
    if worker.rank == 0:
        record["stats"] = worker.server_stats()
        record["curve"] = snapshots.curve(net, x_test, y_test)
        record["params"] = sum(p.numel() for p in net.parameters())
    opt.close()
    Path(out_dir, f"worker-{record['rank']}.json").write_text(json.dumps(record))


class Snapshots:
    """Copies of a model's weights, one row each, with the wall time and step they were taken at."""

    def __init__(self, net: torch.nn.Module, count: int):
        self.rows = torch.zeros(count, sum(p.numel() for p in net.parameters()))
        self.taken: list[tuple[float, int]] = []

    def take(self, net: torch.nn.Module, at: float, step: int) -> None:
        if len(self.taken) == len(self.rows):
            return
        row, offset = self.rows[len(self.taken)], 0
        for p in net.parameters():
            row[offset:offset + p.numel()].copy_(p.detach().reshape(-1))
            offset += p.numel()
        self.taken.append((at, step))

    def curve(self, net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[float, int, float]]:
        """(wall time, step, held-out accuracy) of every copy."""
        out = []
        for row, (at, step) in zip(self.rows, self.taken):
            torch.nn.utils.vector_to_parameters(row, net.parameters())
            with torch.no_grad():
                out.append((at, step, (net(x).argmax(1) == y).float().mean().item()))
        return out


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
