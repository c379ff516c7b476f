"""``DistributedOptimizer``: a torch-style optimizer whose step runs on the parameter servers.

>>> opt = ps.DistributedOptimizer(model, ps.optim.Adam(lr=1e-3))   # doctest: +SKIP
>>> opt.zero_grad(); loss.backward(); opt.step()                   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Optional

import torch

from .optim import OptimizerSpec
from .worker import Worker, init


class DistributedOptimizer:
    """Registers the model's trainable parameters (calling ``ps.init()`` if no worker is given);
    ``step()`` pushes the gradients and pulls the updated values into the parameters.

    Checkpoints (defaults from ps-launch's ``--checkpoint-dir``, ``--checkpoint-every`` and
    ``--resume``): every ``checkpoint_every`` steps ``step()`` saves one; with ``resume`` the
    newest complete one is restored at start, and ``start_step`` says where to continue.
    """

    def __init__(self, model: torch.nn.Module, optimizer: OptimizerSpec, worker: Optional[Worker] = None, *,
                 checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 resume: Optional[bool] = None):
        self.worker = worker if worker is not None else init()
        self._owns_worker = worker is None
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.worker.register(self.params, optimizer=optimizer)
        self._zeros: dict[str, torch.Tensor] = {}
        config = self.worker.config
        self.checkpoint_dir = checkpoint_dir or config.checkpoint_dir
        self.checkpoint_every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
        resume = config.resume if resume is None else resume
        self.start_step = 0
        if resume and self.checkpoint_dir:
            self.start_step = self.worker.load_checkpoint(self.checkpoint_dir) or 0
        self.step_count = self.start_step

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params.values():
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _grads(self) -> dict[str, torch.Tensor]:
        # every block is pushed every step so sync clocks stay aligned; an unused
        # parameter contributes zero, as in DDP with find_unused_parameters
        grads = {}
        for name, p in self.params.items():
            if p.grad is not None:
                grads[name] = p.grad
            else:
                grads[name] = self._zeros.setdefault(name, torch.zeros_like(p))
        return grads

    @torch.no_grad()
    def step(self) -> None:
        self.worker.push_pull(self._grads(), into=self.params).wait()
        self.step_count += 1
        if self.checkpoint_dir and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
            self.worker.save_checkpoint(self.checkpoint_dir, step=self.step_count)

    def close(self) -> None:
        if self._owns_worker:
            self.worker.close()

    def __enter__(self) -> "DistributedOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
