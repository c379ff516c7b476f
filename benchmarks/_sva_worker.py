"""One worker of ``sync_vs_async.py``; started by ps-launch (or the benchmark's local stand-in).

Trains a small CNN on scikit-learn's handwritten digits with the servers' SGD. Every step
appends ``{"rank", "step", "t", "loss"}`` to ``--out-dir/worker-RANK.jsonl``. Every
``--eval-every-s`` seconds rank 0 keeps a copy of the weights it has just pulled; once every
worker is done it evaluates each copy on the held-out split (``"acc"``, ``"test_loss"``, with the
``t`` and ``step`` of the copy) and writes a ``"final"`` line with the servers' counters.
Evaluating after training keeps its cost (six training steps' worth per evaluation) out of the
timings. ``t`` is seconds since the barrier that starts training.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
import torch
import torch.nn.functional as F
from torch import nn

import psframework as ps


def load_digits_split(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """1797 8x8 images scaled to [0, 1]; a stratified 75/25 train/held-out split."""
    from sklearn.datasets import load_digits  # slow to import: the benchmark does it once, for all
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=seed)

    def images(a):
        return torch.tensor(a, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0

    return images(x_tr), torch.tensor(y_tr), images(x_te), torch.tensor(y_te)


def make_model() -> nn.Module:
    torch.manual_seed(0)  # the same start everywhere (register() sends rank 0's anyway)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    logits = model(x)
    return (logits.argmax(1) == y).float().mean().item(), F.cross_entropy(logits, y).item()


@click.command()
@click.option("--out-dir", type=click.Path(file_okay=False), required=True)
@click.option("--steps", type=int, default=300, help="Training steps of every worker.")
@click.option("--batch-size", type=int, default=32)
@click.option("--lr", type=float, default=0.05)
@click.option("--momentum", type=float, default=0.9)
@click.option("--straggler", type=float, default=1.0,
              help="The last rank sleeps (FACTOR - 1) x its compute time every step.")
@click.option("--eval-every-s", type=float, default=0.1)
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="The split saved by the benchmark (torch.save of load_digits_split()).")
def main(out_dir: str, steps: int, batch_size: int, lr: float, momentum: float, straggler: float,
         eval_every_s: float, data: str | None) -> None:
    torch.set_num_threads(1)  # several workers and servers share few cores
    x_tr, y_tr, x_te, y_te = torch.load(data) if data else load_digits_split()
    model = make_model()
    with ps.init() as worker:
        rank, world = worker.rank, worker.num_workers
        slow = straggler > 1 and rank == world - 1
        mine = torch.arange(rank, len(x_tr), world)  # a disjoint shard of the training split
        gen = torch.Generator().manual_seed(1000 + rank)
        opt = ps.DistributedOptimizer(model, ps.optim.SGD(lr=lr, momentum=momentum), worker=worker)
        out = Path(out_dir) / f"worker-{rank}.jsonl"
        with open(out, "w") as log:
            def write(**record) -> None:
                log.write(json.dumps({"rank": rank, **record}) + "\n")
                log.flush()

            worker.barrier()
            start = time.time()
            next_eval = 0.0
            snapshots: list[tuple[int, float, dict[str, torch.Tensor]]] = []
            for step in range(1, steps + 1):
                began = time.perf_counter()
                batch = mine[torch.randint(len(mine), (batch_size,), generator=gen)]
                opt.zero_grad()
                loss = F.cross_entropy(model(x_tr[batch]), y_tr[batch])
                loss.backward()
                if slow:
                    time.sleep((straggler - 1) * (time.perf_counter() - began))
                opt.step()  # push the gradients, pull the servers' weights into the model
                now = time.time() - start
                write(step=step, t=now, loss=loss.item())
                if rank == 0 and now >= next_eval:
                    snapshots.append((step, now, {k: v.detach().clone() for k, v in model.state_dict().items()}))
                    next_eval = now + eval_every_s
            worker.barrier()  # every worker finished its steps
            if rank == 0:
                elapsed = time.time() - start
                final_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                for step, t, weights in snapshots:
                    model.load_state_dict(weights)
                    acc, test_loss = evaluate(model, x_te, y_te)
                    write(step=step, t=t, acc=acc, test_loss=test_loss)
                model.load_state_dict(final_weights)
                params = dict(model.named_parameters())
                with torch.no_grad():
                    worker.pull(params).wait()
                acc, test_loss = evaluate(model, x_te, y_te)
                write(step=steps, t=elapsed, acc=acc, test_loss=test_loss)
                stats = worker.server_stats()
                write(final=True, t=elapsed, acc=acc, test_loss=test_loss, workers=world,
                      steps=steps, applied=sum(s["applied"] for s in stats),
                      blocks=sum(s["blocks"] for s in stats), pushes=sum(s["pushes"] for s in stats))


if __name__ == "__main__":
    main()
