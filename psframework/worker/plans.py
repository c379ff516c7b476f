"""What a worker's exchanges of the same tensors share from one step to the next.

A training loop exchanges the same tensors every step: the blocks they fall in, and where the
pulled values of each parameter go, are the same each time. Worked out per tensor per step they
cost a 100M-parameter model of ~100 tensors milliseconds of Python per step (a GPU step of
~20 ms; ``benchmarks/RESULTS_GPU.md``), so they are worked out once and kept here.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..sharding import Block, Segment, ShardMap

if TYPE_CHECKING:  # pragma: no cover
    from .exchange import Destination

Part = tuple[int, Segment, str]  # (index of the segment in its block, the segment, its key)
Layout = dict[int, tuple[Block, list[Part]]]  # block id -> the block and its parts, in segment order

_MAX_LAYOUTS = 64  # a loop that exchanges ever new subsets of its tensors does not grow us for good


def layout_of(shard_map: ShardMap, names: tuple[str, ...]) -> Layout:
    """The blocks an exchange of ``names`` touches, each with the parts of them it carries."""
    blocks: Layout = {}
    for name in names:
        for block, i, seg in shard_map.pieces_of(name):
            blocks.setdefault(block.block_id, (block, []))[1].append((i, seg, name))
    for _, parts in blocks.values():
        parts.sort(key=lambda part: part[0])
    return blocks


class ExchangePlans:
    def __init__(self, shard_map: ShardMap):
        self.shard_map = shard_map
        self._layouts: dict[tuple[str, ...], Layout] = {}
        # key -> (the destination tensor it was made for, its data pointer, the destination)
        self._destinations: dict[str, tuple[weakref.ref, int, "Destination"]] = {}

    def layout(self, names: tuple[str, ...]) -> Layout:
        """``layout_of(names)``, shared: callers must not change it."""
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[names] = layout_of(self.shard_map, names)
        return layout

    def destination(self, name: str, target: torch.Tensor, make: Callable[[], "Destination"]) -> "Destination":
        """The destination ``make()`` returns for pulls of ``name`` into ``target``, made again only
        when ``target`` is another tensor (or its storage moved). Only for destinations that hold
        nothing of one exchange's own: views of ``target`` and a stream."""
        kept: Optional[tuple] = self._destinations.get(name)
        pointer = target.data_ptr()
        if kept is not None and kept[0]() is target and kept[1] == pointer:
            return kept[2]
        destination = make()
        self._destinations[name] = (weakref.ref(target), pointer, destination)
        return destination


__all__ = ["ExchangePlans", "Layout", "Part", "layout_of"]
