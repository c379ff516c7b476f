"""A sync job for ps-launch fault-tolerance tests; checkpoints come from ps-launch's flags.

    python train_resumable.py OUTDIR [--steps N] [--stop-after S] [--sleep SEC] [--fail-rank R --fail-step S]
                              [--freeze-rank R --freeze-step S]

``--freeze-rank`` stops that worker with SIGSTOP at that step, as a debugger or a frozen machine would.

Writes OUTDIR/worker-RANK.pt: the step it started from and the final parameters.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

import torch

import psframework as ps
from tests.integration import models


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("outdir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-step", type=int, default=-1)
    parser.add_argument("--freeze-rank", type=int, default=-1)
    parser.add_argument("--freeze-step", type=int, default=-1)
    args = parser.parse_args()
    model = torch.nn.Module()
    for name, value in models.make_params(0).items():
        model.register_parameter(name, torch.nn.Parameter(value))
    params = dict(model.named_parameters())
    with ps.DistributedOptimizer(model, models.optimizer_spec("sgd")) as opt:
        rank, n = opt.worker.rank, opt.worker.num_workers
        per = models.BATCH // n
        mine = slice(rank * per, (rank + 1) * per)
        for step in range(opt.start_step, args.stop_after or args.steps):
            if rank == args.fail_rank and step == args.fail_step:
                print(f"worker {rank}: failing on purpose at step {step}", flush=True)
                os._exit(5)
            if rank == args.freeze_rank and step == args.freeze_step:
                print(f"worker {rank}: stopping itself with SIGSTOP at step {step}", flush=True)
                os.kill(os.getpid(), signal.SIGSTOP)
            x, y = models.batch(step)
            opt.zero_grad()
            models.loss_fn(params, x[mine], y[mine]).backward()
            opt.step()
            print(f"worker {rank} done step {step}", flush=True)
            time.sleep(args.sleep)
        torch.save({"start_step": opt.start_step, "params": {k: v.detach().clone() for k, v in params.items()}},
                   Path(args.outdir) / f"worker-{rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
