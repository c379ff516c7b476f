"""The dense store: a server's blocks of the shard map, their values and the optimizer over them.

A block's values are one flat tensor on the server's device; its segments (slices of the model's
tensors) are views of it, and the optimizer steps them as parameters. Each block also carries
the consistency state its policy reads and writes (clocks, version, accumulations, waiting pulls)
and, for shards on a GPU, the pinned buffer its replies are sent from.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Optional

import torch

from .. import protocol as P
from ..buffers import dtype_from_name
from ..datapath.values import SharedValues
from ..devices import Staging
from ..metrics import Recorder
from ..optim import OptimizerSpec, ShardOptimizer
from ..sharding import Block, ShardMap
from ..trace import Tracer


@dataclass
class Pending:
    """A pull (or the pull half of a push_pull) waiting to be answered."""
    peer: bytes
    req: int
    rank: int
    segs: list[int]
    need_version: int  # the worker's clock: its pushes that the answer must reflect
    lane: Optional[Any] = None  # answer through this lane of the worker's (``datapath.lane.Slots``)
    codecs: list = field(default_factory=list)  # of each of ``segs`` in the answer (None: raw; []: all raw)
    shared: bool = False  # the worker reads the answer's values from our shared values, if the block is there
    reader: bool = False  # a reader's (``rank``: the reader): answered once the block's version is ``need_version``
    flag: int = 0  # a device lane's: the number our stream writes into the block's flag after the values
    block: int = -1  # the block a flag is of
    into: Optional[Any] = None  # the view of the worker's memory to write the values into (a direct request's)

    def segment_codecs(self) -> list[tuple[int, Any]]:
        """(segment, its codec in the answer or None) for each of ``segs``."""
        return list(zip(self.segs, self.codecs or [None] * len(self.segs)))


@dataclass
class Pushed:
    """One worker's gradients for a block, by segment. ``whole``: the flat tensor they are views of,
    for a whole block pushed to a GPU (uploaded, or a held slot of a device lane on our GPU).
    ``uploaded``: the event of their copy to the GPU.
    ``owned``: ours to keep and sum into (not views of a lane slot that the worker reuses).
    ``held``: views of a lane slot that the worker leaves alone until we answer (a push_pull's):
    ours to read until the step is applied, and not to write before (the optimizer step may
    scale the gradient in place: nothing reads the slot after our answer)."""
    grads: dict[int, torch.Tensor]
    whole: Optional[torch.Tensor] = None
    uploaded: Optional[torch.cuda.Event] = None
    owned: bool = True
    held: bool = False


@dataclass
class BlockState:
    block: Block
    flat: torch.Tensor  # the block's values; ``params`` are views of it, one per segment
    params: list[torch.Tensor]
    first_param: int  # index of params[0] in the optimizer
    nbytes: list[int]  # of each segment
    clocks: list[int]  # pushes of each worker
    version: int = 0  # updates applied
    accums: dict[int, Any] = field(default_factory=dict)  # sync: step -> its accumulation
    pulls: list[Pending] = field(default_factory=list)
    trackers: list = field(default_factory=list)  # zero-copy replies that may still read ``params``
    # shards on a GPU: the pinned copy that replies are sent from, and the version of each segment in it
    reply: Optional[Staging] = None
    staged: list[int] = field(default_factory=list)
    queued_replies: int = 0
    broken: Optional[str] = None  # why no request on this block can succeed any more
    store: Any = None  # the DenseStore that sums and applies its gradients (policy.py)
    shared: bool = False  # ``flat`` lives in the server's shared values (``datapath/values.py``)
    scratch: Optional[torch.Tensor] = None  # where a sync step's gradients are summed, kept for the next step
    copied: Optional[tuple[int, dict]] = None  # shared values: (version, a copy of them by segment) for replies
    # rounded pulls: (version, {(segment, codec's wire name): payload}), one encoding for every worker's pull
    encodings: Optional[tuple[int, dict]] = None

    @property
    def key(self) -> int:
        return self.block.block_id

    @property
    def size(self) -> int:
        """Bytes of values (what the sync policy weighs due blocks by)."""
        return self.block.nbytes

    def describe(self) -> str:
        return f"block {self.block.block_id} ({', '.join(repr(seg.key) for seg in self.block.segments)})"

    def make_writable(self) -> None:
        """Let the values change although zero-copy replies may still read them: those replies
        keep the old memory (alive until they are sent) and the block moves to a copy. A reader
        that stopped (SIGSTOP, a half-open connection) must never hold an update back; it costs
        one copy of the block, only while a reply is still unsent. Shared values are never sent
        zero-copy, so they stay where the workers read them."""
        self.trackers = [tracker for tracker in self.trackers if not tracker.done]
        if self.trackers:
            self.move_to(self.flat.clone())

    def move_to(self, fresh: torch.Tensor) -> None:
        """Keep the values in ``fresh`` (flat, like the block) from now on; the params follow."""
        for param, seg in zip(self.params, self.block.segments):
            param.set_(fresh.untyped_storage(), fresh.storage_offset() + seg.block_offset, param.size(),
                       param.stride())
        self.flat = fresh
        self.trackers = []

    def byte_offset(self, i: int) -> int:
        return self.block.segments[i].block_offset * self.params[i].element_size()

    def covers(self, segs: list[int]) -> bool:
        """Whether ``segs`` (distinct, validated) is the whole block, so it can move as one copy."""
        return len(segs) == len(self.params)

    def split(self, whole: torch.Tensor) -> dict[int, torch.Tensor]:
        """Views of a flat tensor laid out like the block, one per segment."""
        return {i: whole[s.block_offset:s.block_offset + s.numel] for i, s in enumerate(self.block.segments)}

    def forget_staged(self) -> None:
        """The values changed outside an update (init, restore): the reply caches are stale."""
        self.staged = [-1] * len(self.staged)
        self.copied = None
        self.encodings = None

    def version_copy(self) -> dict[int, torch.Tensor]:
        """The values by segment, copied once per version: what socket replies of shared values
        send (those change in place, where the workers of this host read them), one copy for all
        the replies of a version (remote workers', readers')."""
        if self.copied is None or self.copied[0] != self.version:
            self.copied = (self.version, self.split(self.flat.clone()))
        return self.copied[1]

    def encoded(self, i: int, codec: Any) -> torch.Tensor:
        """Segment ``i`` encoded with ``codec`` (a pull's rounding), once per version: the payload is
        a fresh tensor that no update writes to, so every reply of the version may send it."""
        if self.encodings is None or self.encodings[0] != self.version:
            self.encodings = (self.version, {})
        cache, key = self.encodings[1], (i, codec.wire)
        if key not in cache:
            cache[key] = codec.encode(self.params[i].reshape(-1))
        return cache[key]


@dataclass
class _Sums:
    """A sync step's gradients of a block, summed over the workers that pushed it."""
    tensors: dict[int, Any] = field(default_factory=dict)  # the sums (at the step, a list: for the optimizer to sum)
    whole: Optional[torch.Tensor] = None  # the flat tensor that every one of ``tensors`` is a view of, if any
    adds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (sum, addend) still to add
    borrowed: set[int] = field(default_factory=set)  # segments whose ``tensors`` are still a held lane slot
    scratch: Optional[torch.Tensor] = None  # the block's scratch, if the sums are in it
    # segments whose gradients (held lane slots, or ours) are summed only at the step: a tile at a
    # time as the optimizer steps it, where it can (optim.ShardOptimizer.tiles)
    parts: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    ours: set[int] = field(default_factory=set)  # segments whose first part is ours to sum into

    def add(self, total: torch.Tensor, addend: torch.Tensor, owned: bool) -> None:
        """Sum now what the worker will reuse; what is ours is summed with the others in one go."""
        if owned:
            self.adds.append((total, addend))
        else:
            total.add_(addend)


class DenseStore:
    """The blocks one server holds, and one optimizer over all their segments."""

    def __init__(self, device: torch.device, recorder: Optional[Recorder] = None, tracer: Optional[Tracer] = None):
        self.device = device
        self.recorder, self.tracer = recorder or Recorder(), tracer or Tracer(None)
        self.blocks: dict[int, BlockState] = {}
        self.optimizer: Optional[ShardOptimizer] = None
        self.nbytes = 0
        self.applied = 0  # updates, counted per block
        self.rank = -1
        self.shared: Optional[SharedValues] = None  # the blocks' values, once workers of this host read them

    def setup(self, shard_map: ShardMap, rank: int, spec: OptimizerSpec, num_workers: int) -> list[Block]:
        on_gpu = self.device.type == "cuda"
        self.rank = rank
        params: list[torch.Tensor] = []
        self.close()  # shared values of an earlier setup
        self.blocks.clear()
        mine = shard_map.blocks_of_server(rank)
        for block in mine:
            flat = torch.zeros(block.numel, dtype=dtype_from_name(block.dtype), device=self.device)
            views = [flat[s.block_offset:s.block_offset + s.numel] for s in block.segments]
            self.blocks[block.block_id] = BlockState(
                block=block, flat=flat, params=views, first_param=len(params),
                nbytes=[p.numel() * p.element_size() for p in views], clocks=[0] * num_workers,
                reply=Staging(block.nbytes) if on_gpu else None, staged=[-1] * len(block.segments), store=self)
            params.extend(views)
        self.nbytes = sum(b.nbytes for b in mine)
        self.optimizer = ShardOptimizer(spec, params)
        return list(mine)

    def segments(self, block: int, segs: Optional[list[int]]) -> tuple[BlockState, list[int]]:
        """A block held here and the segments asked of it (None: all); ``Rejected`` for a bad one."""
        state = self.blocks.get(block)
        if state is None:
            raise P.Rejected(P.BAD_REQUEST, f"block {block} is not held by server {self.rank}")
        n = len(state.block.segments)
        segs = list(range(n)) if segs is None else segs
        if not all(0 <= i < n for i in segs) or len(set(segs)) != len(segs):
            raise P.Rejected(P.BAD_REQUEST, f"bad segment list for block {block}")
        if state.broken is not None:
            raise P.Rejected(P.CONFIG, state.broken)
        return state, segs

    def resolve(self, request: P.BlockRequest, num_workers: int) -> tuple[BlockState, list[int], list[int]]:
        """The block a request is about, its segments, and those of them it pushes a gradient for;
        ``Rejected`` for anything it may not ask."""
        if self.optimizer is None:
            raise P.Rejected(P.BAD_REQUEST, "this server has no tensors yet: call register() first")
        if not 0 <= request.rank < num_workers:
            raise P.Rejected(P.BAD_REQUEST, f"bad worker rank {request.rank}")
        state, segs = self.segments(request.block, request.segs)
        if request.dtype and request.dtype != state.block.dtype:
            keys = ", ".join(state.block.segments[i].key for i in segs)
            raise P.Rejected(P.BAD_REQUEST, f"dtype {request.dtype} does not match {state.block.dtype} of {keys}")
        if not request.absent:
            return state, segs, segs
        absent = set(request.absent)
        if len(absent) != len(request.absent) or not absent <= set(segs) or isinstance(request, (P.Pull, P.Init)):
            raise P.Rejected(P.BAD_REQUEST, f"bad list of segments without a gradient for block {request.block}")
        return state, segs, [i for i in segs if i not in absent]

    def apply(self, group: list[tuple[BlockState, dict[int, torch.Tensor], Optional[torch.Tensor]]],
              scale: float) -> None:
        """One optimizer step over the gradients (by segment) of each block in ``group``, with the
        flat tensor they are views of where every segment has one (None: not known). Segments
        without a gradient are not stepped, and a block with none is not counted."""
        group = [entry for entry in group if entry[1]]
        if not group:
            return
        started, started_us = time.perf_counter(), self.tracer.now_us()
        with self.writing(state for state, _, _ in group):
            grads = {}
            for state, tensors, whole in group:
                state.make_writable()  # replies of host shards are sent straight from the parameters
                if whole is not None and len(tensors) == len(state.params) and \
                        self.optimizer.step_run(state.first_param, len(state.params), state.flat, whole, scale):
                    continue
                for i, grad in tensors.items():
                    grads[state.first_param + i] = (grad if isinstance(grad, list) or grad.device == self.device
                                                    else grad.to(self.device, non_blocking=True))
            self.optimizer.step(grads, scale=scale)
        self.recorder.observe("psframework_server_apply_seconds", time.perf_counter() - started)
        if self.tracer.enabled:  # the block list is built only for a trace
            self.tracer.complete("apply", started_us, "apply", blocks=[state.block.block_id for state, _, _ in group])
        self.applied += len(group)

    # -- what the consistency policy asks of a store (policy.py) ------------------------

    def apply_now(self, state: BlockState, pushed: Pushed) -> None:
        """One push, at once (async and ssp)."""
        if pushed.uploaded is not None:
            torch.cuda.current_stream(self.device).wait_event(pushed.uploaded)
        self.apply([(state, pushed.grads, pushed.whole)], scale=1.0)

    def accumulate(self, state: BlockState, accum, pushed: Pushed) -> None:
        """Add one worker's push to a sync step's sum (``accum.data``)."""
        sums = accum.data = accum.data or _Sums()
        if pushed.whole is not None and not sums.tensors:
            # a held lane slot is read where it is, as by segment below
            sums.whole = pushed.whole if pushed.owned or pushed.held else pushed.whole.clone()
            sums.tensors = dict(pushed.grads) if sums.whole is pushed.whole else state.split(sums.whole)
            if not pushed.owned and pushed.held:
                sums.borrowed = set(sums.tensors)
        elif pushed.whole is not None and sums.whole is not None and sums.borrowed:
            self._add_to_borrowed(state, sums, pushed)
        elif pushed.whole is not None and sums.whole is not None:
            sums.add(sums.whole, pushed.whole, pushed.owned or pushed.held)
        else:
            for i, grad in pushed.grads.items():
                if self.device.type == "cpu" and (pushed.owned or pushed.held) and i not in sums.tensors:
                    if i not in sums.parts and pushed.owned:
                        sums.ours.add(i)
                    sums.parts.setdefault(i, []).append(grad)
                    continue
                if i in sums.parts:  # a push to add at once: what came before is summed first
                    sums.tensors[i] = self._sum_parts(state, sums, i)
                total = sums.tensors.get(i)
                if total is None:
                    # received host messages and fresh device tensors are ours to keep and sum into;
                    # a held lane slot is read where it is, and only a second push needs a place to sum
                    sums.tensors[i] = grad if pushed.owned or pushed.held else grad.clone()
                    if pushed.held and not pushed.owned:
                        sums.borrowed.add(i)
                elif i in sums.borrowed and pushed.owned:
                    # an upload may still be landing: our stream adds it only at the step, and the
                    # fresh tensor is ours to sum into
                    sums.tensors[i] = grad
                    sums.adds.append((grad, total))
                    sums.borrowed.discard(i)
                    sums.whole = None  # the sums are no longer views of one tensor
                elif i in sums.borrowed:
                    sums.tensors[i] = torch.add(total, grad, out=self._scratch(state, sums)[i])
                    sums.borrowed.discard(i)
                    sums.whole = None
                else:
                    sums.add(total, grad.to(self.device, non_blocking=True), pushed.owned or pushed.held)

    def _add_to_borrowed(self, state: BlockState, sums: _Sums, pushed: Pushed) -> None:
        """A whole push onto a sum that is still a held lane slot (never ours to write): an upload,
        which may still be landing, becomes the sum and the slot is added at the step; another
        held slot (on our GPU, landed) is added now, into the scratch."""
        if pushed.owned:
            sums.adds.append((pushed.whole, sums.whole))
            sums.whole, sums.tensors = pushed.whole, dict(pushed.grads)
        else:
            sums.whole = torch.add(sums.whole, pushed.whole, out=self._scratch_flat(state, sums))
            sums.tensors = state.split(sums.whole)
        sums.borrowed = set()

    @classmethod
    def _scratch(cls, state: BlockState, sums: _Sums) -> dict[int, torch.Tensor]:
        """Views, by segment, of the step's scratch (``_scratch_flat``)."""
        return state.split(cls._scratch_flat(state, sums))

    @staticmethod
    def _scratch_flat(state: BlockState, sums: _Sums) -> torch.Tensor:
        """Where a step's sums go: the block's scratch (or a fresh tensor, while an earlier step
        of the block holds the scratch), allocated once, so no step pays for fresh pages."""
        if sums.scratch is None:
            if state.scratch is None:
                state.scratch = torch.empty_like(state.flat)
            busy = any(isinstance(a.data, _Sums) and a.data.scratch is state.scratch for a in state.accums.values())
            sums.scratch = torch.empty_like(state.flat) if busy else state.scratch
        return sums.scratch

    def _sum_parts(self, state: BlockState, sums: _Sums, i: int) -> torch.Tensor:
        """The sum of segment ``i``'s deferred gradients: into the first, if it is ours, else into
        the block's scratch."""
        parts = sums.parts.pop(i)
        if i in sums.ours:
            total = parts[0]
        elif len(parts) == 1:
            return self._scratch(state, sums)[i].copy_(parts[0])
        else:
            total = torch.add(parts[0], parts.pop(1), out=self._scratch(state, sums)[i])
        for more in parts[1:]:
            total.add_(more)
        return total

    def _settle_parts(self, state: BlockState, sums: _Sums) -> None:
        """What a step gives the optimizer for each deferred segment: a single gradient as it
        is, several as a list for it to sum tile by tile, or their sum where it cannot."""
        for i in list(sums.parts):
            parts = sums.parts[i]
            if len(parts) == 1:
                sums.tensors[i] = sums.parts.pop(i)[0]
            elif self.optimizer.tiles(state.first_param + i):
                sums.tensors[i] = sums.parts.pop(i)
            else:
                sums.tensors[i] = self._sum_parts(state, sums, i)

    def apply_steps(self, steps: list) -> int:
        """Complete sync steps of blocks: one sum for all, and one optimizer step per mean (one,
        unless an elastic job shrank); returns the optimizer steps run."""
        for state, accum in steps:
            if accum.data and accum.data.parts:
                self._settle_parts(state, accum.data)
        adds = [pair for _, accum in steps if accum.data for pair in accum.data.adds]
        for batch in _distinct_totals(adds):
            torch._foreach_add_([total for total, _ in batch], [addend for _, addend in batch])
        by_scale: dict[float, list] = {}
        for state, accum in steps:
            # the mean over those who pushed: equal to all workers unless an elastic job shrank
            tensors, whole = (accum.data.tensors, accum.data.whole) if accum.data else ({}, None)
            by_scale.setdefault(1.0 / len(accum.contributors), []).append((state, tensors, whole))
        for scale, group in by_scale.items():
            self.apply(group, scale)
        return len(by_scale)

    def write(self, state: BlockState, values: dict[int, torch.Tensor]) -> None:
        """Set segments' values (rank 0's initial values)."""
        state.make_writable()
        with self.writing([state]):
            for i, value in values.items():
                state.params[i].copy_(value)
        state.forget_staged()

    # -- shared values (datapath/values.py) ------------------------------------------------

    def share(self, name: str) -> SharedValues:
        """Move every block's values into a new shared-memory file that the workers of this host
        map (once; later calls return the same file). OSError if the memory is not there."""
        if self.shared is None:
            shared = SharedValues.create(name, [(b.block.block_id, b.block.nbytes) for b in self.blocks.values()])
            for state in self.blocks.values():
                region = shared.slot(state.block.block_id, 0, state.block.nbytes).view(state.flat.dtype)
                region.copy_(state.flat)
                state.move_to(region)  # zero-copy replies still in flight keep the old memory
                state.shared = True
            self.shared = shared
        return self.shared

    @contextmanager
    def writing(self, states: Iterable[BlockState]) -> Iterator[None]:
        """The values of ``states`` change inside: readers of shared values wait or read again."""
        if self.shared is None:
            yield
            return
        with self.shared.writing([state.block.block_id for state in states]):
            yield

    def close(self) -> None:
        if self.shared is not None:
            self.shared.close()
            self.shared = None

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict:
        # copies: a view would save the whole storage it is in (shared values: every block's)
        return {"blocks": {bid: {"params": [p.detach().to("cpu", copy=True) for p in st.params],
                                 "clocks": list(st.clocks),
                                 "version": st.version} for bid, st in self.blocks.items()},
                "optimizer": self.optimizer.state_dict()}

    def restore(self, payload: dict, where: str) -> None:
        from ..errors import CheckpointError

        saved = payload["blocks"]
        if set(saved) != set(self.blocks):
            raise CheckpointError(f"{where} holds blocks {sorted(saved)[:5]}..., this server "
                                  f"holds {sorted(self.blocks)[:5]}...")
        for block_id, state in self.blocks.items():
            state.make_writable()
            with self.writing([state]):
                for param, value in zip(state.params, saved[block_id]["params"]):
                    param.copy_(value)
            state.clocks = list(saved[block_id]["clocks"])
            state.version = int(saved[block_id]["version"])
            state.accums.clear()
            state.broken = None
            state.forget_staged()  # the GPU reply cache holds pre-restore values
        self.optimizer.load_state_dict(payload["optimizer"])


def _distinct_totals(adds: list[tuple[torch.Tensor, torch.Tensor]]) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """``adds`` in batches, in order, none of which adds to one tensor twice: a CUDA
    ``_foreach_add_`` given one target twice adds both at once and loses one (half the
    elements of ``[t, t, t] += [1, 2, 1]`` came out 2, not 4, on an H200)."""
    batches: list[list] = []
    seen: dict[int, int] = {}
    for total, addend in adds:
        k = seen[id(total)] = seen.get(id(total), -1) + 1
        if k == len(batches):
            batches.append([])
        batches[k].append((total, addend))
    return batches


__all__ = ["BlockState", "DenseStore", "Pending", "Pushed"]
