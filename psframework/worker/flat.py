"""A model's small tensors as views of flat buffers laid out like the servers' blocks, and their gradients' buffers.

``sharding.assign_shards`` packs whole small tensors into blocks and cuts a large one into blocks
of one piece each. A large tensor's block is one contiguous region of the tensor already; a
packed block is one region only if its tensors lie one after another in memory, in the block's
order. ``FlatViews`` makes that so: the tensors of the packed blocks become views of one flat
buffer per device and dtype, block after block, and a second buffer of the same layout holds
their gradients for the servers (``stage``: one fused copy per device at the step). Every block
is then one region each way: one copy through a lane, and one region that a server may read (and
write) where it lies (``docs/direct-device-exchange.md``; ``DistributedOptimizer`` keeps them so
in memory the servers map).

GPU gradients are staged rather than accumulated in place (DDP's ``gradient_as_bucket_view``):
in place, every backward adds each gradient into its zeroed view, one kernel and one Python hook
per tensor on autograd's thread, and a zeroing per step, where torch's own ``AccumulateGrad``
keeps the gradient it got. For a GPT of about 100 tensors on one GPU that was about 3 ms of host
time a step (profiled, ``benchmarks/RESULTS_GPU.md``, twentieth round), on the critical path of a
model whose step waits on its host, and more device traffic than the one copy it saved. Host
gradients (``host_in_place``) are the views themselves, accumulated in place: there a gradient
torch makes anew each step costs page faults on fresh memory (a 67 MB MLP's backward took 12 ms
longer, and its iteration 1.02-1.14 of the lanes' time against 0.82-0.86 in place;
``benchmarks/RESULTS.md``), and an add costs no launch.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping, Optional

import torch

from ..sharding import Block
from .plans import PackedBlock

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


def _packable(blocks: Iterable[Block], layout: list[tuple]) -> dict[int, tuple[int, int, int, tuple[str, ...]]]:
    """The blocks laid out in ``layout`` (``FlatViews._layout``: a buffer's device, dtype, size and
    each tensor's offset) whose segments fill them with no gap, each with where it starts in its
    buffer, its size, the buffer's index and its tensors in order (one region of ``block.numel``
    elements then holds the block as the server does)."""
    offsets = [dict(placed) for *_, placed in layout]
    packable = {}
    for block in blocks:
        keys = {seg.key for seg in block.segments}
        index = next((i for i, placed in enumerate(offsets) if keys <= placed.keys()), None)
        if len(block.segments) < 2 or index is None:
            continue
        segments = sorted(block.segments, key=lambda seg: seg.block_offset)
        ends = [seg.block_offset + seg.numel for seg in segments]
        if segments[0].block_offset != 0 or ends[-1] != block.numel or \
                any(seg.block_offset != end for seg, end in zip(segments[1:], ends)):
            continue
        packable[block.block_id] = (offsets[index][segments[0].key], block.numel, index,
                                    tuple(seg.key for seg in segments))
    return packable


def _torch_empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, device=device, dtype=dtype)


class FlatViews:
    """The tensors of ``params`` that ``flat_layout`` places, made views of flat buffers (values
    copied), and a gradient view of each in flat buffers of the same layout, which ``stage``
    fills. ``allocate`` makes the buffers (``numel, dtype, device``; torch's by default);
    ``whole``: the other tensors get buffers of their own too (host tensors the servers are to map
    need it: ``shared_empty``); ``values=False``: the parameters stay where they are;
    ``host_in_place``: the gradients of host tensors are their views (``in_place``), which backward
    accumulates into and ``zero_grad`` zeroes."""

    def __init__(self, params: Mapping[str, torch.Tensor], blocks: Iterable[Block],
                 allocate: Callable[[int, torch.dtype, torch.device], torch.Tensor] = _torch_empty,
                 whole: bool = False, values: bool = True, host_in_place: bool = False):
        blocks = list(blocks)
        self.params = dict(params)
        self._allocate = allocate
        places = {name: (p.device, p.dtype) for name, p in self.params.items()}
        # (device, dtype, elements, [(name, element offset)]) of each buffer
        self._layout = [(device, dtype, size, list(offsets.items()))
                        for (device, dtype), (size, offsets) in flat_layout(blocks, places).items()]
        placed = {name for *_, offsets in self._layout for name, _ in offsets}
        self._layout += [(p.device, p.dtype, p.numel(), [(name, 0)])
                         for name, p in self.params.items() if whole and name not in placed]
        self._values: dict[str, torch.Tensor] = {}  # name -> value view (with ``values``)
        self._grads: dict[str, torch.Tensor] = {}  # name -> gradient view
        self.in_place = {name for device, *_, offsets in self._layout for name, _ in offsets
                         if host_in_place and device.type == "cpu"}
        self._value_buffers: list[torch.Tensor] = []
        self._grad_buffers: list[torch.Tensor] = []
        self._packable = _packable(blocks, self._layout)
        # block id -> the gradient views of its tensors, and the block as one region each way (``packed``)
        self._packed: dict[int, tuple[tuple[tuple[str, torch.Tensor], ...], PackedBlock]] = {}
        self._staging: dict[str, tuple] = {}  # name -> what ``stage`` checks (``_index_staging``)
        value_buffers = self._allocate_all() if values else None
        grad_buffers = self._allocate_all()
        if value_buffers is not None:
            self._new_values(value_buffers)
        self._new_grads(grad_buffers)

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
                self._values[name] = value

    def _new_grads(self, buffers: list[torch.Tensor]) -> None:
        """Gradient views in ``buffers``; those ``in_place`` become their parameters' gradients,
        holding what those hold now."""
        self._grad_buffers = buffers
        for grads, (*_, offsets) in zip(buffers, self._layout):
            for name, param, grad in self._views_in(grads, offsets):
                self._grads[name] = grad
                if name not in self.in_place:
                    continue
                if param.grad is None:
                    grad.zero_()
                else:
                    grad.copy_(param.grad)
                param.grad = grad
        self._pack()
        self._index_staging()

    def _pack(self) -> None:
        """Each packable block as one region of the gradient buffers and one of the value buffers
        (once the values are views; the buffers are new after ``renew``)."""
        self._packed = {}
        if not self._value_buffers:
            return
        for block_id, (start, numel, index, names) in self._packable.items():
            views = tuple((name, self._grads[name]) for name in names)
            self._packed[block_id] = (views, PackedBlock(frozenset(names), self._grad_buffers[index][start:start + numel],
                                                         self._value_buffers[index][start:start + numel]))

    def _index_staging(self) -> None:
        """Per tensor, what ``stage`` reads: its gradient view and that view's address, its parameter
        and its value view's address (None: the values are not views), the number of its place
        (device and dtype: one fused copy each), and the shape, dtype and device a gradient must
        have to be staged. Made whole, then swapped in."""
        staging: dict[str, tuple] = {}
        places: dict[tuple, int] = {}
        for device, dtype, _, offsets in self._layout:
            place = places.setdefault((device, dtype), len(places))
            for name, _ in offsets:
                view, value = self._grads[name], self._values.get(name)
                staging[name] = (view, view.data_ptr(), self.params[name],
                                 None if value is None else value.data_ptr(), place, view.shape, dtype, device)
        self._staging = staging

    def packed(self, staged: Mapping[str, Optional[torch.Tensor]]) -> dict[int, PackedBlock]:
        """The blocks whose every tensor's gradient ``stage`` staged into its view (``staged``, its
        answer: a parameter moved off its view, a gradient that does not fit or is None leave
        their block out), each as one region of gradients and one of values."""
        whole = {block_id: self.packed_block(block_id, staged) for block_id in self._packed}
        return {block_id: packed for block_id, packed in whole.items() if packed is not None}

    def packed_block(self, block_id: int, staged: Mapping[str, Optional[torch.Tensor]]) -> Optional[PackedBlock]:
        """``packed`` of one block: its regions if ``stage`` staged its every gradient into its view."""
        views, packed = self._packed.get(block_id, ((), None))
        return packed if packed is not None and all(staged.get(name) is view for name, view in views) else None

    @property
    def regions(self) -> dict[int, PackedBlock]:
        """Every block ``packed`` may give, whatever is staged."""
        return {block_id: packed for block_id, (_, packed) in self._packed.items()}

    def grad_is_view(self, name: str) -> bool:
        grad = self.params[name].grad
        return grad is not None and grad.data_ptr() == self._grads[name].data_ptr()

    def zero_grad(self) -> None:
        """Zero the gradient buffers ``in_place`` and give each of their parameters its view back
        (a gradient that is another tensor now is dropped, as torch's ``zero_grad`` drops it)."""
        for grads, (device, *_) in zip(self._grad_buffers, self._layout):
            if device.type == "cpu" and self.in_place:
                grads.zero_()
        for name in self.in_place:
            self.params[name].grad = self._grads[name]

    @property
    def names(self) -> list[str]:
        return list(self._grads)

    @property
    def grad_buffers(self) -> list[torch.Tensor]:
        return list(self._grad_buffers)

    @property
    def buffers(self) -> list[torch.Tensor]:
        """Every buffer the views are in now: the values' (if views), then the gradients'."""
        return self._value_buffers + self._grad_buffers

    def grad_view(self, name: str) -> torch.Tensor:
        return self._grads[name]

    def stage(self, grads: Mapping[str, Optional[torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
        """Copy the gradients of the views' tensors into their gradient views, in one fused copy per
        device and dtype; each one's view, or None where it has no gradient. Left out: names that
        are not views, and those whose parameter no longer lies in its value view (``p.data = ...``)
        or whose gradient has another shape, dtype or device than its view (the caller pushes those
        as they are, and its checks say what is wrong). Runs every step over every tensor: what it
        checks is read from ``_staging``, worked out once per layout."""
        staged: dict[str, Optional[torch.Tensor]] = {}
        copies: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        staging = self._staging
        for name, grad in grads.items():
            entry = staging.get(name)
            if entry is None:
                continue
            view, view_ptr, param, value_ptr, place, shape, dtype, device = entry
            if value_ptr is not None and param.data_ptr() != value_ptr:
                continue
            if grad is None:
                staged[name] = None
                continue
            if grad.dtype is not dtype or grad.shape != shape or grad.device != device:
                continue
            if grad.layout is not torch.strided:
                grad = grad.to_dense()  # a sparse gradient (``nn.Embedding(sparse=True)``)
            staged[name] = view
            if grad.data_ptr() != view_ptr:
                into, sources = copies.setdefault(place, ([], []))
                into.append(view)
                sources.append(grad)
        with torch.no_grad():  # a gradient made with create_graph requires grad; its copy records nothing
            for into, sources in copies.values():
                torch._foreach_copy_(into, sources)
        return staged

    def renew(self) -> list[torch.Tensor]:
        """Move the values, where they are views, to new buffers with what they hold, and the
        gradient views to new buffers; the old buffers, returned, are left to whoever may still
        read or write them (a server that has yet to answer a failed step). Raises what
        ``allocate`` raises, with every view as it was."""
        values = self._allocate_all() if self._value_buffers else None
        grads = self._allocate_all()
        old = self.buffers
        if values is not None:
            self._new_values(values)
        self._new_grads(grads)
        return old


__all__ = ["FlatViews", "flat_layout"]
