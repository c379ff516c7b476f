"""The embedding tables of a ``DistributedOptimizer``: the rows its modules looked up this step,
their gradients, and the rows it fetched ahead for the next step.

A module's forward asks ``lookup`` for the rows of its batch: the distinct ids are pulled (or taken
from a prefetch of exactly those ids) and handed back as a leaf tensor whose gradient backward
fills in; ``push`` sends the gradients of every lookup since the last step, one message per server.
``prefetch`` pulls the next batch's rows while this step runs; the servers answer it once this
worker's next push is applied, so the rows are as fresh as the mode allows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch

from .errors import ConfigError, RolledBackError
from .worker.requests import Future
from .worker.rows import as_ids


class TableLookups:
    def __init__(self, worker, modules: Mapping[str, Any], before_lookup: Callable[[], None]):
        self.worker = worker
        self._before_lookup = before_lookup  # the optimizer's chance to take a rolled-back model's values
        self.modules = dict(modules)  # table name -> its module
        self._looked_up: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (table, distinct ids, rows leaf)
        self._prefetched: dict[str, tuple[torch.Tensor, Any]] = {}  # table -> (distinct ids, its pull)

    def _distinct(self, name: str, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _, spec = self.worker.rows.spec(name)
        return torch.unique(as_ids(spec, ids, self.worker.rows.max_message_bytes), return_inverse=True)

    def lookup(self, module, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the distinct ids of ``ids`` on the module's device, and where each id is among them."""
        name = module.bound_name
        distinct, where = self._distinct(name, ids)
        self.worker.client.catch_up()  # a rollback heard of by now is drawn before the forward goes on
        self._before_lookup()
        try:
            rows = self._pull(name, distinct, module.training)
        except RolledBackError:
            # the job went back to a checkpoint while we asked: this forward goes on with the
            # restored model (the optimizer takes its dense values first)
            self._prefetched = {}
            self._before_lookup()
            rows = self._pull(name, distinct, module.training)
        rows = rows.to(module.device)
        if module.training and torch.is_grad_enabled():
            rows.requires_grad_(True)
            self._looked_up.append((name, distinct, rows))
        return rows, where.to(module.device)

    def _pull(self, name: str, distinct: torch.Tensor, train: bool) -> torch.Tensor:
        ahead = self._prefetched.pop(name, None)
        if ahead is not None and torch.equal(ahead[0], distinct):
            return ahead[1].wait()[name]
        return self.worker.rows.pull({name: distinct}, train=train, single=True).wait()

    def forget(self) -> None:
        """Drop this step's lookups and prefetches (the job went back to a checkpoint)."""
        self._looked_up, self._prefetched = [], {}

    def prefetch(self, inputs: Mapping[Any, torch.Tensor]) -> None:
        """Start the pulls of the next batch's rows: ``inputs`` maps a module (or its table's name)
        to the ids its forward will get."""
        lookups = {}
        for key, ids in inputs.items():
            name = key if isinstance(key, str) else getattr(key, "bound_name", None)
            if name not in self.modules:
                raise ConfigError(f"prefetch(): {key!r} is not a table of this DistributedOptimizer; its tables: "
                                  f"{', '.join(self.modules)}")
            lookups[name] = self._distinct(name, ids)[0]
        train = any(self.modules[name].training for name in lookups)
        future = self.worker.rows.pull(lookups, train=train, after=1)
        self._prefetched.update({name: (distinct, future) for name, distinct in lookups.items()})

    def push(self) -> Future:
        """Push the gradients of every row looked up since the last step (repeats summed)."""
        pushes: dict[str, tuple[list, list]] = {}
        for name, distinct, rows in self._looked_up:
            if rows.grad is not None:
                ids, grads = pushes.setdefault(name, ([], []))
                ids.append(distinct)
                grads.append(rows.grad.detach().to("cpu", torch.float32))
        self._looked_up = []
        return self.worker.rows.push({name: (torch.cat(ids), torch.cat(grads)) for name, (ids, grads) in pushes.items()})


__all__ = ["TableLookups"]
