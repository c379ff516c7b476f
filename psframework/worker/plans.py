"""What a worker's exchanges of the same tensors share from one step to the next.

A training loop exchanges the same tensors every step: the blocks they fall in, and where the
pulled values of each parameter go, are the same each time. Worked out per tensor per step they
cost a 100M-parameter model of ~100 tensors milliseconds of Python per step (a GPU step of
~20 ms; ``benchmarks/RESULTS_GPU.md``), so they are worked out once and kept here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch

from ..sharding import Block, Segment, ShardMap

if TYPE_CHECKING:  # pragma: no cover
    from .exchange import Destination

Part = tuple[int, Segment, str]  # (index of the segment in its block, the segment, its key)
Layout = dict[int, tuple[Block, list[Part]]]  # block id -> the block and its parts, in segment order


@dataclass(frozen=True)
class PackedBlock:
    """A block of several tensors whose gradients lie one after another in one region, in the
    block's order, and whose values are views of one region of the same layout
    (``worker/flat.py``): exchanged as one piece each way, with no work per tensor."""
    names: frozenset[str]
    grads: torch.Tensor  # the block's gradients, flat
    values: torch.Tensor  # where its values go, flat


def packed_names(packed: Optional[Mapping[int, PackedBlock]]) -> frozenset[str]:
    """The tensors of ``packed``'s blocks."""
    return frozenset().union(*(block.names for block in packed.values())) if packed else frozenset()


def whole_segment(block: Block) -> Segment:
    """All of ``block`` as one segment (of a ``PackedBlock``: ``slot_piece``, ``LaneCopy``)."""
    return Segment(key="", offset=0, numel=block.numel, block_offset=0)


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
    def __init__(self, shard_map: ShardMap, registered: Mapping[str, torch.Tensor]):
        self.shard_map = shard_map
        self._registered = registered  # the tensors given to register(), which the worker holds anyway
        self._layouts: dict[tuple[str, ...], Layout] = {}
        self._destinations: dict[str, tuple[int, "Destination"]] = {}  # key -> (data pointer, destination)

    def layout(self, names: tuple[str, ...]) -> Layout:
        """``layout_of(names)``, shared: callers must not change it."""
        layout = self._layouts.get(names)
        if layout is None:
            if len(self._layouts) >= _MAX_LAYOUTS:
                self._layouts.clear()
            layout = self._layouts[names] = layout_of(self.shard_map, names)
        return layout

    def drop_moved(self) -> None:
        """Forget the destinations of registered tensors whose storage moved (``p.data = ...``, a
        model moved to another device): they hold views of the old storage, which would otherwise
        stay allocated until the key is pulled again."""
        moved = [name for name, (pointer, _) in self._destinations.items()
                 if self._registered[name].data_ptr() != pointer]
        for name in moved:
            del self._destinations[name]

    def destination(self, name: str, target: torch.Tensor, make: Callable[[], "Destination"]) -> "Destination":
        """The destination ``make()`` returns for pulls of ``name`` into ``target``: kept for the
        tensor registered as ``name`` while its storage stays where it is (``p.data = ...`` moves
        it), made anew for any other tensor, which is not kept alive here. Only for destinations
        that hold nothing of one exchange's own: views of ``target`` and a stream."""
        if self._registered.get(name) is not target:
            return make()
        pointer = target.data_ptr()
        kept: Optional[tuple[int, "Destination"]] = self._destinations.get(name)
        if kept is not None and kept[0] == pointer:
            return kept[1]
        destination = make()
        self._destinations[name] = (pointer, destination)
        return destination


__all__ = ["ExchangePlans", "Layout", "PackedBlock", "Part", "layout_of", "packed_names", "whole_segment"]
