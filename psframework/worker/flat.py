"""A model's small tensors and their gradients as views of flat buffers laid out like the servers' blocks.

``sharding.assign_shards`` packs whole small tensors into blocks and cuts a large one into blocks
of one piece each. A large tensor's block is one contiguous region of the tensor already; a
packed block is one region only if its tensors lie one after another in memory, in the block's
order. ``FlatViews`` makes that so: the tensors of the packed blocks become views of one flat
buffer per device and dtype, block after block, and their gradients views of a second one, which
backward accumulates into in place (as DDP's ``gradient_as_bucket_view``). Every block is then one
region each way: one copy through a lane, and one region that a server may read (and write)
where it lies (``docs/direct-device-exchange.md``; ``DistributedOptimizer`` keeps its host
gradients so, in shared memory).
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

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


def _torch_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, device=device, dtype=dtype)


class FlatViews:
    """The tensors of ``params`` that ``flat_layout`` places, made views of flat buffers (values
    copied), with gradients that are views of zeroed flat buffers of the same layout. ``allocate``
    makes the buffers (``numel, dtype, device``; torch's by default); ``whole``: the other tensors
    get buffers of their own too (host tensors the servers are to map need it: ``shared_empty``);
    ``values=False``: only the gradients become views, the parameters stay where they are."""

    def __init__(self, params: Mapping[str, torch.Tensor], blocks: Iterable[Block],
                 allocate: Callable[[int, torch.dtype, torch.device], torch.Tensor] = _torch_empty,
                 whole: bool = False, values: bool = True):
        self.params = dict(params)
        self._allocate = allocate
        places = {name: (p.device, p.dtype) for name, p in self.params.items()}
        # (device, dtype, elements, [(name, element offset)]) of each buffer
        self._layout = [(device, dtype, size, list(offsets.items()))
                        for (device, dtype), (size, offsets) in flat_layout(blocks, places).items()]
        placed = {name for *_, offsets in self._layout for name, _ in offsets}
        self._layout += [(p.device, p.dtype, p.numel(), [(name, 0)])
                         for name, p in self.params.items() if whole and name not in placed]
        self._views: dict[str, tuple[Optional[torch.Tensor], torch.Tensor]] = {}  # name -> (value view, grad view)
        self._value_buffers: list[torch.Tensor] = []
        self._grad_buffers: list[torch.Tensor] = []
        value_buffers = self._allocate_all() if values else None
        grad_buffers = self._allocate_all()
        if value_buffers is not None:
            self._new_values(value_buffers)
        else:
            self._views = {name: (None, self.params[name].data) for *_, offsets in self._layout for name, _ in offsets}
        self._new_grads(grad_buffers, copy=False)
        self.restore()

    def _allocate_all(self) -> list[torch.Tensor]:
        """One new buffer per place of the layout (all made before any is used: a failure leaves
        the views as they were)."""
        return [self._allocate(size, dtype, device) for device, dtype, size, _ in self._layout]

    def _views_in(self, buffer: torch.Tensor, offsets: list[tuple[str, int]]):
        for name, offset in offsets:
            param = self.params[name]
            yield name, param, buffer[offset:offset + param.numel()].view(param.shape)

    def _new_values(self, buffers: list[torch.Tensor]) -> None:
        """The parameters made views of ``buffers``, holding the values they hold now."""
        self._value_buffers = buffers
        for buffer, (*_, offsets) in zip(buffers, self._layout):
            for name, param, value in self._views_in(buffer, offsets):
                value.copy_(param.detach())
                param.data = value
                self._views[name] = (value, self._views.get(name, (None, value))[1])

    def _new_grads(self, buffers: list[torch.Tensor], copy: bool) -> None:
        """Gradient views in ``buffers`` (holding what the old views hold, with ``copy``)."""
        self._grad_buffers = buffers
        for grads, (*_, offsets) in zip(buffers, self._layout):
            grads.zero_()
            for name, _, grad in self._views_in(grads, offsets):
                if copy:
                    grad.copy_(self._views[name][1])
                self._views[name] = (self._views[name][0], grad)

    @property
    def names(self) -> list[str]:
        return list(self._views)

    @property
    def grad_buffers(self) -> list[torch.Tensor]:
        return list(self._grad_buffers)

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Every buffer the views are in now: the values' (if views), then the gradients'."""
        return self._value_buffers + self._grad_buffers

    def grad_is_view(self, name: str) -> bool:
        grad = self.params[name].grad
        return grad is not None and grad.data_ptr() == self._views[name][1].data_ptr()

    def intact(self, name: str) -> bool:
        """Whether ``name``'s value and gradient are still the views (``p.data = ...`` or a
        ``zero_grad(set_to_none=True)`` elsewhere breaks them)."""
        value = self._views[name][0]
        return (value is None or self.params[name].data_ptr() == value.data_ptr()) and self.grad_is_view(name)

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
        """Zero the views' gradients in place and give every parameter its view back (a gradient
        that is another tensor now is dropped, as torch's ``zero_grad`` drops it)."""
        for grads in self._grad_buffers:
            grads.zero_()
        for name, (_, grad) in self._views.items():
            self.params[name].grad = grad

    def renew(self) -> list[torch.Tensor]:
        """Move the gradients, and the values where they are views, to new buffers with what they
        hold; the old buffers, returned, are left to whoever may still read or write them (a
        server that has yet to answer a failed step). Raises what ``allocate`` raises, with every
        view as it was."""
        values = self._allocate_all() if self._value_buffers else None
        grads = self._allocate_all()
        old = self.buffers
        old_grads = {name: grad for name, (_, grad) in self._views.items()}
        if values is not None:
            self._new_values(values)
        self._new_grads(grads, copy=True)
        for name, grad in old_grads.items():
            param = self.params[name]
            if param.grad is not None and param.grad.data_ptr() == grad.data_ptr():
                param.grad = self._views[name][1]
        return old


__all__ = ["FlatViews", "flat_layout"]
