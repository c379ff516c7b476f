"""id -> slot: an open-addressing hash table in torch ops, with no Python loop over rows.

Keys are int64 ids, values the slots of their rows in a table's slabs. Lookups and inserts of a
whole batch run as a few vectorised rounds of linear probing (one round per probe distance, not
per id). The table is kept at most half full, so probe runs stay short; it is rebuilt when it
grows, and after evictions (``remove``), which avoids tombstones.

>>> import torch
>>> index = RowIndex()
>>> index.insert(torch.tensor([10, -3, 2**40]), torch.tensor([0, 1, 2]))
>>> index.lookup(torch.tensor([2**40, 7, 10])).tolist()
[2, -1, 0]
"""

from __future__ import annotations

import torch

from ..rowhash import mix64

EMPTY = -1


class RowIndex:
    def __init__(self, capacity: int = 1024, device: torch.device = torch.device("cpu")):
        self.device = device
        self.size = 0
        self._allocate(max(16, 1 << (max(1, capacity) - 1).bit_length()))

    def _allocate(self, buckets: int) -> None:
        self._keys = torch.zeros(buckets, dtype=torch.int64, device=self.device)
        self._slots = torch.full((buckets,), EMPTY, dtype=torch.int64, device=self.device)
        self._claims = torch.full((buckets,), EMPTY, dtype=torch.int64, device=self.device)
        self._mask = buckets - 1

    def _home(self, ids: torch.Tensor) -> torch.Tensor:
        return mix64(ids) & self._mask

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """The slot of each id, or -1 where it has none."""
        position = self._home(ids)
        slots = self._slots[position]
        hit = (slots != EMPTY) & (self._keys[position] == ids)
        found = torch.where(hit, slots, EMPTY)  # the first round, without gathers: most ids are at home
        active = ((slots != EMPTY) & ~hit).nonzero().reshape(-1)
        position = (position[active] + 1) & self._mask
        while active.numel():
            slots = self._slots[position]
            hit = (slots != EMPTY) & (self._keys[position] == ids[active])
            found[active[hit]] = slots[hit]
            going_on = (slots != EMPTY) & ~hit
            active, position = active[going_on], (position[going_on] + 1) & self._mask
        return found

    def insert(self, ids: torch.Tensor, slots: torch.Tensor) -> None:
        """Add ``ids`` (distinct, none present yet) with their ``slots``."""
        if 2 * (self.size + ids.numel()) > self._mask + 1:
            self._grow(self.size + ids.numel())
        active = torch.arange(ids.numel(), device=self.device)
        position = self._home(ids)
        while active.numel():
            free = self._slots[position] == EMPTY
            # several ids may probe the same free position in one round: one of them claims it
            self._claims[position[free]] = active[free]
            won = free.clone()
            won[free] = self._claims[position[free]] == active[free]
            self._keys[position[won]] = ids[active[won]]
            self._slots[position[won]] = slots[active[won]]
            active, position = active[~won], (position[~won] + (~free[~won]).long()) & self._mask
        self.size += ids.numel()

    def _grow(self, needed: int) -> None:
        ids, slots = self.items()
        self._allocate(1 << (4 * needed - 1).bit_length())
        self.size = 0
        if ids.numel():
            self.insert(ids, slots)

    def items(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (id, slot), in no particular order."""
        used = self._slots != EMPTY
        return self._keys[used], self._slots[used]

    def remove(self, ids: torch.Tensor) -> None:
        """Forget ``ids`` (the table is rebuilt from what stays)."""
        keys, slots = self.items()
        keep = ~torch.isin(keys, ids)
        self._allocate(self._mask + 1)
        self.size = 0
        if keep.any():
            self.insert(keys[keep], slots[keep])


__all__ = ["RowIndex"]
