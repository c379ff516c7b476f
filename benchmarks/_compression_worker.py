"""One worker of benchmarks/compression.py: ``python benchmarks/_compression_worker.py OUT_DIR JSON``.

Trains an MLP of about 2.2 million parameters on scikit-learn's digits (its shard of a stratified
75/25 split) with ``ps.DistributedOptimizer`` and the codec given; rank 0 keeps a copy of the weights
every ``eval_every_s`` seconds and evaluates the copies on the held-out part after training, so
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


def accuracy(net: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    net.load_state_dict(state)
    with torch.no_grad():
        return (net(x).argmax(1) == y).float().mean().item()


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
    snapshots, step_times = [], []
    worker.barrier()
    start = last_snapshot = time.perf_counter()
    if worker.rank == 0:
        snapshots.append((0.0, 0, {k: v.clone() for k, v in net.state_dict().items()}))
    for step in range(options["steps"]):
        began = time.perf_counter()
        batch = torch.randint(0, len(x), (options["batch"],), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x[batch]), y[batch]).backward()
        opt.step()
        now = time.perf_counter()
        step_times.append(now - began)
        if worker.rank == 0 and now - last_snapshot >= options["eval_every_s"]:
            snapshots.append((now - start, step + 1, {k: v.clone() for k, v in net.state_dict().items()}))
            last_snapshot = now
    worker.barrier()
    wall = time.perf_counter() - start
    record = {"rank": worker.rank, "wall_s": wall, "steps": options["steps"], "step_times": step_times}
    if worker.rank == 0:
        record["stats"] = worker.server_stats()
        snapshots.append((wall, options["steps"], {k: v.clone() for k, v in net.state_dict().items()}))
        record["curve"] = [(t, s, accuracy(net, state, x_test, y_test)) for t, s, state in snapshots]
        record["params"] = sum(p.numel() for p in net.parameters())
    opt.close()
    Path(out_dir, f"worker-{record['rank']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]))
