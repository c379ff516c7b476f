"""Train an MLP on scikit-learn's bundled handwritten digits with psframework.

Run it under ps-launch (from the repository root):

    ps-launch -n 2 -s 2 --mode sync --server-device cpu -- python examples/train_digits.py

Each worker trains on its slice of every mini-batch; the servers apply SGD with momentum.
Worker 0 reports the held-out accuracy after each epoch.
"""

from __future__ import annotations

import time

import click
import torch
from sklearn.datasets import load_digits

import psframework as ps


def load(seed: int = 0):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    return (x[:split], y[:split]), (x[split:], y[split:])


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    model.input_shape = (64,)  # one example, for ps-serve (README: serving)
    return model


@click.command()
@click.option("--epochs", default=8, show_default=True)
@click.option("--batch-size", default=64, show_default=True, help="global batch, split across workers")
@click.option("--lr", default=0.1, show_default=True)
def main(epochs: int, batch_size: int, lr: float) -> None:
    (x_train, y_train), (x_test, y_test) = load()
    model = make_model()
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=lr, momentum=0.9)) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        start = time.monotonic()
        for epoch in range(1, epochs + 1):
            total, count = 0.0, 0
            for i in range(0, len(x_train) - batch_size + 1, batch_size):
                share = batch_size // n
                rows = slice(i + rank * share, i + (rank + 1) * share)
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(x_train[rows]), y_train[rows])
                loss.backward()
                opt.step()
                total, count = total + loss.item(), count + 1
            if rank == 0:
                with torch.no_grad():
                    accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
                print(f"epoch {epoch}/{epochs}  loss {total / count:.4f}  held-out accuracy {accuracy:.3f}  "
                      f"({time.monotonic() - start:.2f} s, mode {opt.worker.mode}, {n} workers)", flush=True)
        opt.worker.barrier()


if __name__ == "__main__":
    main()
