"""A model's small tensors and their gradients as views of flat buffers laid out like the servers' blocks.

``sharding.assign_shards`` packs whole small tensors into blocks and cuts a large one into blocks
of one piece each. A large tensor's block is one contiguous region of the tensor already; a
packed block is one region only if its tensors lie one after another in memory, in the block's
order. ``FlatViews`` makes that so: the tensors of the packed blocks become views of one flat
buffer per device and dtype, block after block, and their gradients views of a second one, which
backward accumulates into in place (as DDP's ``gradient_as_bucket_view``). Every block is then one
region each way: one copy through a lane, and one region that a GPU server may read and write
where it lies (``docs/direct-device-exchange.md``). Not wired into the exchanges yet.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..sharding import Block

Place = tuple  # (device, dtype) of a tensor


def flat_layout(blocks: Iterable[Block], places: Mapping[str, Place]) -> dict[Place, tuple[int, dict[str, int]]]:
    """Per place, the size of its flat buffer and each tensor's element offset in it: the blocks
    of several segments whose tensors are all in ``places`` and share one place, block after
    block, in the block's order. Tensors of other blocks stay out (a large tensor's own pieces,
    a block mixing places or holding a tensor not asked for)."""
    layout: dict[Place, tuple[int, dict[str, int]]] = {}
    for block in blocks:
        if len(block.segments) < 2:
            continue
        block_places = {places.get(seg.key) for seg in block.segments}
        if len(block_places) != 1 or None in block_places:
            continue
        place = block_places.pop()
        size, offsets = layout.get(place, (0, {}))
        for seg in block.segments:  # whole tensors: a packed block holds no piece of a larger one
            offsets[seg.key] = size + seg.block_offset
        layout[place] = (size + block.numel, offsets)
    return layout


class FlatViews:
    """The tensors of ``params`` that ``flat_layout`` places, made views of flat buffers (values
    copied), with gradients that are views of zeroed flat buffers of the same layout."""

    def __init__(self, params: Mapping[str, torch.Tensor], blocks: Iterable[Block]):
        self.params = dict(params)
        places = {name: (p.device, p.dtype) for name, p in self.params.items()}
        self.values: dict[Place, torch.Tensor] = {}
        self.grads: dict[Place, torch.Tensor] = {}
        self._views: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (value view, grad view)
        for place, (size, offsets) in flat_layout(blocks, places).items():
            device, dtype = place
            values = self.values[place] = torch.empty(size, device=device, dtype=dtype)
            grads = self.grads[place] = torch.zeros(size, device=device, dtype=dtype)
            for name, offset in offsets.items():
                param = self.params[name]
                end = offset + param.numel()
                value, grad = values[offset:end].view(param.shape), grads[offset:end].view(param.shape)
                value.copy_(param.detach())
                param.data = value
                self._views[name] = (value, grad)
        self.restore()

    @property
    def names(self) -> list[str]:
        return list(self._views)

    def intact(self, name: str) -> bool:
        """Whether ``name``'s value and gradient are still the views (``p.data = ...`` or a
        ``zero_grad(set_to_none=True)`` elsewhere breaks them)."""
        value, grad = self._views[name]
        param = self.params[name]
        return param.data_ptr() == value.data_ptr() and param.grad is not None and \
            param.grad.data_ptr() == grad.data_ptr()

    def restore(self) -> None:
        """Give every gradient its view back (with what it holds, if it is another tensor now)."""
        for name, (_, grad) in self._views.items():
            param = self.params[name]
            if param.grad is None:
                grad.zero_()
            elif param.grad.data_ptr() != grad.data_ptr():
                grad.copy_(param.grad)
            else:
                continue
            param.grad = grad

    def zero_grad(self) -> None:
        """Zero the views' gradients in place, views kept (the other tensors' are the caller's)."""
        for grads in self.grads.values():
            grads.zero_()
        self.restore()


__all__ = ["FlatViews", "flat_layout"]
