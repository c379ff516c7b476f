"""The dense store: a server's blocks of the shard map, their values and the optimizer over them.

A block's values are one flat tensor on the server's device; its segments (slices of the model's
tensors) are views of it, and the optimizer steps them as parameters. Each block also carries
the consistency state its policy reads and writes (clocks, version, accumulations, waiting pulls)
and, for shards on a GPU, the pinned buffer its replies are sent from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import protocol as P
from ..buffers import dtype_from_name
from ..devices import Staging
from ..optim import OptimizerSpec, ShardOptimizer
from ..sharding import Block, ShardMap


@dataclass
class Pending:
    """A pull (or the pull half of a push_pull) waiting to be answered."""
    peer: bytes
    req: int
    rank: int
    segs: list[int]
    need_version: int  # the worker's clock: its pushes that the answer must reflect
    lane: bool = False  # answer through the worker's shared-memory lane


@dataclass
class Pushed:
    """One worker's gradients for a block, by segment. ``whole``: the flat tensor they are views of,
    for a whole block pushed to a GPU. ``uploaded``: the event of their copy to the GPU.
    ``owned``: ours to keep and sum into (not views of a lane slot that the worker reuses)."""
    grads: dict[int, torch.Tensor]
    whole: Optional[torch.Tensor] = None
    uploaded: Optional[torch.cuda.Event] = None
    owned: bool = True


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

    def make_writable(self) -> None:
        """Let the values change although zero-copy replies may still read them: those replies
        keep the old memory (alive until they are sent) and the block moves to a copy. A reader
        that stopped (SIGSTOP, a half-open connection) must never hold an update back; it costs
        one copy of the block, only while a reply is still unsent."""
        self.trackers = [tracker for tracker in self.trackers if not tracker.done]
        if not self.trackers:
            return
        fresh = self.flat.clone()
        for param, seg in zip(self.params, self.block.segments):
            param.set_(fresh.untyped_storage(), seg.block_offset, param.size(), param.stride())
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
        """The values changed outside an update (init, restore): the reply cache is stale."""
        self.staged = [-1] * len(self.staged)


class DenseStore:
    """The blocks one server holds, and one optimizer over all their segments."""

    def __init__(self, device: torch.device):
        self.device = device
        self.blocks: dict[int, BlockState] = {}
        self.optimizer: Optional[ShardOptimizer] = None
        self.nbytes = 0
        self.applied = 0  # updates, counted per block
        self.rank = -1

    def setup(self, shard_map: ShardMap, rank: int, spec: OptimizerSpec, num_workers: int) -> list[Block]:
        on_gpu = self.device.type == "cuda"
        self.rank = rank
        params: list[torch.Tensor] = []
        self.blocks.clear()
        mine = shard_map.blocks_of_server(rank)
        for block in mine:
            flat = torch.zeros(block.numel, dtype=dtype_from_name(block.dtype), device=self.device)
            views = [flat[s.block_offset:s.block_offset + s.numel] for s in block.segments]
            self.blocks[block.block_id] = BlockState(
                block=block, flat=flat, params=views, first_param=len(params),
                nbytes=[p.numel() * p.element_size() for p in views], clocks=[0] * num_workers,
                reply=Staging(block.nbytes) if on_gpu else None, staged=[-1] * len(block.segments))
            params.extend(views)
        self.nbytes = sum(b.nbytes for b in mine)
        self.optimizer = ShardOptimizer(spec, params)
        return list(mine)

    def resolve(self, request: P.BlockRequest, num_workers: int) -> tuple[BlockState, list[int], list[int]]:
        """The block a request is about, its segments, and those of them it pushes a gradient for;
        ``Rejected`` for anything it may not ask."""
        if self.optimizer is None:
            raise P.Rejected(P.BAD_REQUEST, "this server has no tensors yet: call register() first")
        state = self.blocks.get(request.block)
        if state is None:
            raise P.Rejected(P.BAD_REQUEST, f"block {request.block} is not held by server {self.rank}")
        if not 0 <= request.rank < num_workers:
            raise P.Rejected(P.BAD_REQUEST, f"bad worker rank {request.rank}")
        n = len(state.block.segments)
        segs = list(range(n)) if request.segs is None else request.segs
        if not all(0 <= i < n for i in segs) or len(set(segs)) != len(segs):
            raise P.Rejected(P.BAD_REQUEST, f"bad segment list for block {request.block}")
        if state.broken is not None:
            raise P.Rejected(P.CONFIG, state.broken)
        if request.dtype and request.dtype != state.block.dtype:
            keys = ", ".join(state.block.segments[i].key for i in segs)
            raise P.Rejected(P.BAD_REQUEST, f"dtype {request.dtype} does not match {state.block.dtype} of {keys}")
        if not request.absent:
            return state, segs, segs
        absent = set(request.absent)
        if len(absent) != len(request.absent) or not absent <= set(segs) or isinstance(request, (P.Pull, P.Init)):
            raise P.Rejected(P.BAD_REQUEST, f"bad list of segments without a gradient for block {request.block}")
        return state, segs, [i for i in segs if i not in absent]

    def apply(self, group: list[tuple[BlockState, dict[int, torch.Tensor]]], scale: float) -> None:
        """One optimizer step over the gradients (by segment) of each block in ``group``. Segments
        without a gradient are not stepped, and a block with none is not counted."""
        group = [(state, tensors) for state, tensors in group if tensors]
        if not group:
            return
        grads = {}
        for state, tensors in group:
            state.make_writable()  # replies of host shards are sent straight from the parameters
            for i, grad in tensors.items():
                grads[state.first_param + i] = grad.to(self.device, non_blocking=True)
        self.optimizer.step(grads, scale=scale)
        self.applied += len(group)

    def write(self, state: BlockState, values: dict[int, torch.Tensor]) -> None:
        """Set segments' values (rank 0's initial values)."""
        state.make_writable()
        for i, value in values.items():
            state.params[i].copy_(value)
        state.forget_staged()

    # -- checkpoints ---------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"blocks": {bid: {"params": [p.detach().cpu() for p in st.params], "clocks": list(st.clocks),
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
            for param, value in zip(state.params, saved[block_id]["params"]):
                param.copy_(value)
            state.clocks = list(saved[block_id]["clocks"])
            state.version = int(saved[block_id]["version"])
            state.accums.clear()
            state.broken = None
            state.forget_staged()  # the GPU reply cache holds pre-restore values
        self.optimizer.load_state_dict(payload["optimizer"])


__all__ = ["BlockState", "DenseStore", "Pending", "Pushed"]
