"""A tiny sync training job for ps-launch tests: each worker trains on its slice of every batch.

    python train_check.py OUTDIR [--fail-rank R --fail-step S --fail-code C] [--pause-rank R]

Writes OUTDIR/worker-RANK.pt (final parameters) and OUTDIR/worker-RANK.json (what the worker saw:
rank, host, bind address, pid, network namespace, Slurm node, the PS_TEST_* variables, where its job secret was). ``make_data`` and ``STEPS`` are imported
by the tests to compute the single-process reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

STEPS = 5
BATCH = 8
LR = 0.1


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 1)


def make_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    return [(torch.randn(BATCH, 4, generator=g), torch.randn(BATCH, 1, generator=g)) for _ in range(STEPS)]


def my_slice(x: torch.Tensor, rank: int, num_workers: int) -> torch.Tensor:
    size = BATCH // num_workers
    return x[rank * size:(rank + 1) * size]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=0)
    parser.add_argument("--fail-code", type=int, default=3)
    parser.add_argument("--pause-rank", type=int, default=-1, help="this rank blocks after step 1")
    args = parser.parse_args()
    outdir = Path(args.outdir)

    import psframework as ps

    model = make_model()
    with ps.init() as worker:
        rank, n = worker.rank, worker.num_workers
        info = {"rank": rank, "pid": os.getpid(), "host": os.environ.get("PS_HOST"),
                "bind": os.environ.get("PS_BIND"), "role": os.environ.get("PS_ROLE"),
                "netns": os.readlink("/proc/self/ns/net"), "secret_file": os.environ.get("PS_SECRET_FILE"),
                "slurm_node": os.environ.get("SLURMD_NODENAME"),
                "test_env": {k: v for k, v in os.environ.items() if k.startswith("PS_TEST_")},
                "threads": torch.get_num_threads()}
        (outdir / f"worker-{rank}.json").write_text(json.dumps(info))
        opt = ps.DistributedOptimizer(model, ps.optim.SGD(lr=LR), worker=worker)
        for step, (x, y) in enumerate(make_data()):
            if rank == args.fail_rank and step == args.fail_step:
                print(f"worker {rank}: failing on purpose at step {step}", flush=True)
                return args.fail_code
            if rank == args.pause_rank and step == 1:
                (outdir / f"worker-{rank}.paused").write_text(str(os.getpid()))
                time.sleep(3600)
            loss = torch.nn.functional.mse_loss(model(my_slice(x, rank, n)), my_slice(y, rank, n))
            opt.zero_grad()
            loss.backward()
            opt.step()
            print(f"worker {rank} step {step} loss {loss.item():.6f}", flush=True)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, outdir / f"worker-{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
