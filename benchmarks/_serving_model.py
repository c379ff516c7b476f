"""The model benchmarks/serving.py serves: ``benchmarks._serving_model:mlp``.

``BENCH_SLOW_REPLICA=I`` and ``BENCH_SLOW_MS=M``: the replica of index I (``PS_SERVE_REPLICA``)
sleeps M ms more per example of every forward pass, a replica on a slower or busier machine.
"""

from __future__ import annotations

import os
import time

import torch

IN, HIDDEN, OUT = 256, 1024, 16


class MLP(torch.nn.Module):
    input_shape = (IN,)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN),
                                       torch.nn.ReLU(), torch.nn.Linear(HIDDEN, OUT))
        slow = os.environ.get("BENCH_SLOW_REPLICA")
        self.delay = float(os.environ.get("BENCH_SLOW_MS", "0")) / 1000 if (
            slow is not None and slow == os.environ.get("PS_SERVE_REPLICA")) else 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.delay:
            time.sleep(self.delay * x.shape[0])
        return self.net(x)


def mlp() -> torch.nn.Module:
    torch.set_num_threads(1)  # replicas share the host's cores
    return MLP()
