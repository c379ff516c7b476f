"""One embedding table's rows on one server: contiguous slabs, an id -> slot index, admission and
eviction. No Python object per row and no Python loop over rows.

- Values and each piece of optimizer state are slabs of ``[slots, ...]`` that double when full;
  ``ids[slot]`` says which id a slot holds. Freed slots (evictions) are reused first.
- A row is created on its first touch in training (a training lookup, or a push), or with
  ``admit_after=k`` on its k-th occurrence in training lookups (one per lookup that contains it;
  counted in a count-min sketch, so the memory of the counts is bounded). Until then it reads as
  its initial value and its gradients are dropped.
- ``capacity``: when creating rows would exceed this server's share of it (``capacity_share``),
  the least recently used rows are evicted.
  ``ttl_steps``: after each update, rows untouched for that many of the table's steps are evicted.
  An evicted row starts afresh on its next touch.
- A lookup that may not create rows (evaluation) reads unknown ids as their initial value.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import rowhash
from ..optim import OptimizerSpec
from ..tables import TableSpec
from .row_rules import apply_rule, state_shapes
from .rowindex import RowIndex

SKETCH_DEPTH, SKETCH_WIDTH = 4, 1 << 16


class Table:
    def __init__(self, spec: TableSpec, rule: OptimizerSpec, device: torch.device, capacity: Optional[int] = None):
        self.spec, self.rule, self.device = spec, rule, device
        self.capacity = capacity  # this server's share of the table's (``tables.capacity_share``)
        self.index = RowIndex(device=device)
        self._shapes = state_shapes(rule, spec.dim)
        self.values = torch.empty(0, spec.dim, device=device)
        self.state = {name: torch.zeros(0, *shape, device=device) for name, shape in self._shapes.items()}
        self.ids = torch.empty(0, dtype=torch.int64, device=device)  # the id in each slot
        self.touched = torch.empty(0, dtype=torch.int64, device=device)  # the tick of its last touch (LRU)
        self.touched_step = torch.empty(0, dtype=torch.int64, device=device)  # the step of its last touch (TTL)
        self.free = torch.empty(0, dtype=torch.int64, device=device)
        self.used = 0  # slots handed out (a freed slot stays counted until reused)
        self.step = 0  # updates applied
        self.tick = 0  # lookups and updates
        self.sketch = (torch.zeros(SKETCH_DEPTH, SKETCH_WIDTH, dtype=torch.int32, device=device)
                       if spec.admit_after > 1 else None)
        self.evictions = 0
        self.admissions = 0
        self.over_capacity = 0  # new rows not created: the batch's own rows filled this server's share

    @property
    def rows(self) -> int:
        return self.index.size

    # -- lookups -------------------------------------------------------------------------

    def lookup(self, ids: torch.Tensor, train: bool, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The rows of ``ids`` (distinct int64); a training lookup creates the admitted ones.
        ``out``: where to write them (a lane's row area on the host), instead of a fresh tensor."""
        self.tick += 1
        slots = self.index.lookup(ids)
        if train:
            missing = slots < 0
            self._touch(slots[~missing])  # first: making room for the new rows never evicts these
            if missing.any():
                new = self._admit(ids[missing])
                if new is not None:
                    created = self._create(new, ids[missing], kept=int((~missing).sum()))
                    slots[missing] = created
                    self._touch(created[created >= 0])
        known = slots >= 0
        if bool(known.all()):  # the common case: one gather, no masks
            if out is None:
                return self.values.index_select(0, slots)
            if out.device == self.values.device:
                return torch.index_select(self.values, 0, slots, out=out)
            return out.copy_(self.values.index_select(0, slots))
        rows = self._rows_or_initial(ids, slots, known)
        return rows if out is None else out.copy_(rows)

    def _rows_or_initial(self, ids: torch.Tensor, slots: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
        """Rows by slot where ``known``, the ids' initial rows elsewhere."""
        out = torch.empty(ids.numel(), self.spec.dim, device=self.device)
        out[known] = self.values[slots[known]]
        out[~known] = rowhash.initial_rows(self.spec, ids[~known])
        return out

    def _admit(self, ids: torch.Tensor) -> Optional[torch.Tensor]:
        """Which of these missing ids get a row now: a mask over them (None: none do)."""
        if self.sketch is None:
            return torch.ones(ids.numel(), dtype=torch.bool, device=self.device)
        cells = self._cells(ids)
        for d in range(SKETCH_DEPTH):
            self.sketch[d].index_add_(0, cells[d], torch.ones_like(cells[d], dtype=torch.int32))
        seen = torch.stack([self.sketch[d][cells[d]] for d in range(SKETCH_DEPTH)]).amin(dim=0)
        admitted = seen >= self.spec.admit_after
        return admitted if admitted.any() else None

    def _cells(self, ids: torch.Tensor) -> list[torch.Tensor]:
        return [rowhash.mix64(ids + d * 0x51ED27) & (SKETCH_WIDTH - 1) for d in range(SKETCH_DEPTH)]

    def _create(self, admitted: torch.Tensor, candidates: torch.Tensor, kept: int) -> torch.Tensor:
        """Rows for the admitted candidates, at their initial values, beside the ``kept`` rows of the
        same batch (touched already); the slot of every candidate (-1 for those not admitted)."""
        admitted = self._within_capacity(admitted, kept)
        ids = candidates[admitted]
        self._make_room(ids.numel())
        slots = self._take_slots(ids.numel())
        self.values[slots] = rowhash.initial_rows(self.spec, ids)
        for name, slab in self.state.items():
            slab[slots] = 0
        self.ids[slots] = ids
        self.index.insert(ids, slots)
        self.admissions += ids.numel()
        result = torch.full((candidates.numel(),), -1, dtype=torch.int64, device=self.device)
        result[admitted] = slots
        return result

    def _within_capacity(self, admitted: torch.Tensor, kept: int) -> torch.Tensor:
        """The admitted candidates that fit beside the batch's ``kept`` rows; those that do not are
        not created (they read as their initial value and their gradients are dropped, as if
        evicted at once; counted in ``over_capacity``)."""
        if self.capacity is None:
            return admitted
        over = admitted.nonzero().flatten()[max(0, self.capacity - kept):]
        if not over.numel():
            return admitted
        self.over_capacity += over.numel()
        admitted = admitted.clone()
        admitted[over] = False
        return admitted

    def _make_room(self, count: int) -> None:
        """Evict the least recently used rows to make room for ``count`` new ones; the batch's own
        rows, touched in this tick, are the most recent, and ``_within_capacity`` left room for them."""
        if self.capacity is None or self.rows + count <= self.capacity:
            return
        _, slots = self.index.items()
        order = torch.argsort(self.touched[slots])
        self._evict(slots[order[:self.rows + count - self.capacity]])

    def _take_slots(self, count: int) -> torch.Tensor:
        reused, self.free = self.free[:count], self.free[count:]
        fresh = count - reused.numel()
        if self.used + fresh > self.values.shape[0]:
            self._grow(max(2 * self.values.shape[0], self.used + fresh, 64))
        slots = torch.cat([reused, torch.arange(self.used, self.used + fresh, device=self.device)])
        self.used += fresh
        return slots

    def _grow(self, slots: int) -> None:
        def grown(slab: torch.Tensor) -> torch.Tensor:
            bigger = torch.zeros(slots, *slab.shape[1:], dtype=slab.dtype, device=self.device)
            bigger[:slab.shape[0]] = slab
            return bigger

        self.values = grown(self.values)
        self.state = {name: grown(slab) for name, slab in self.state.items()}
        self.ids, self.touched, self.touched_step = grown(self.ids), grown(self.touched), grown(self.touched_step)

    def _touch(self, slots: torch.Tensor) -> None:
        self.touched[slots] = self.tick
        self.touched_step[slots] = self.step

    def _evict(self, slots: torch.Tensor) -> None:
        if slots.numel():
            self.index.remove(self.ids[slots])
            self.free = torch.cat([self.free, slots])
            self.evictions += slots.numel()

    # -- updates -------------------------------------------------------------------------

    def update(self, ids: torch.Tensor, grads: torch.Tensor) -> None:
        """One step of the update rule on the rows of ``ids`` (distinct). A missing row is created
        first, unless admission holds it back: then its gradient is dropped."""
        self.tick += 1
        self.step += 1
        slots = self.index.lookup(ids)
        missing = slots < 0
        if missing.any() and self.sketch is None:
            self._touch(slots[~missing])
            slots[missing] = self._create(torch.ones(int(missing.sum()), dtype=torch.bool, device=self.device),
                                          ids[missing], kept=int((~missing).sum()))
        known = slots >= 0
        if not bool(known.all()):
            slots, grads = slots[known], grads[known]
        if slots.numel():
            apply_rule(self.rule, self.values, self.state, slots, grads, self.step)
            self._touch(slots)
        if self.spec.ttl_steps is not None:
            _, live = self.index.items()
            self._evict(live[self.touched_step[live] < self.step - self.spec.ttl_steps])

    def load(self, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Set rows (rank 0's pretrained values), creating those that do not exist."""
        slots = self.index.lookup(ids)
        missing = slots < 0
        if missing.any():
            self._touch(slots[~missing])
            slots[missing] = self._create(torch.ones(int(missing.sum()), dtype=torch.bool, device=self.device),
                                          ids[missing], kept=int((~missing).sum()))
        known = slots >= 0  # beyond the capacity, pretrained rows read as their initial values
        self.values[slots[known]] = values.to(self.device, self.values.dtype)[known]

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict:
        ids, slots = self.index.items()
        order = torch.argsort(ids)
        ids, slots = ids[order], slots[order]
        return {"ids": ids.cpu(), "values": self.values[slots].cpu(),
                "state": {name: slab[slots].cpu() for name, slab in self.state.items()},
                "touched": self.touched[slots].cpu(), "touched_step": self.touched_step[slots].cpu(),
                "step": self.step, "tick": self.tick, "evictions": self.evictions, "admissions": self.admissions,
                "over_capacity": self.over_capacity,
                "sketch": None if self.sketch is None else self.sketch.cpu()}

    def restore(self, saved: dict) -> None:
        fresh = Table(self.spec, self.rule, self.device, self.capacity)
        n = saved["ids"].numel()
        slots = fresh._take_slots(n)
        fresh.values[slots] = saved["values"].to(self.device)
        for name, slab in fresh.state.items():
            slab[slots] = saved["state"][name].to(self.device)
        fresh.ids[slots] = saved["ids"].to(self.device)
        fresh.touched[slots] = saved["touched"].to(self.device)
        fresh.touched_step[slots] = saved["touched_step"].to(self.device)
        fresh.index.insert(fresh.ids[slots], slots)
        fresh.step, fresh.tick = int(saved["step"]), int(saved["tick"])
        fresh.evictions, fresh.admissions = int(saved["evictions"]), int(saved["admissions"])
        fresh.over_capacity = int(saved.get("over_capacity", 0))
        if saved["sketch"] is not None:
            fresh.sketch = saved["sketch"].to(self.device)
        self.__dict__.update(fresh.__dict__)


__all__ = ["Table"]
