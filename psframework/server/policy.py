"""Consistency policies: what a push does to a block, and when a pull may be answered.

One policy is chosen from the job's mode when the server joins (``policy_for``):

- ``Sync``: a step's update is applied once every worker the step waits for pushed it (the mean
  gradient); a worker's pull is answered once all of its own pushes are applied.
- ``Async``: every push is applied as it arrives; pulls answer at once.
- ``SSP``: like async, but a worker's pull waits until it is at most ``staleness`` pushes ahead
  of the slowest live worker.

A policy reads and writes the consistency state of each block (``clocks``, ``version``,
``accums``) and applies updates through the store; it never touches sockets or lanes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from ..node import Membership
from .device import DeviceIO
from .steps import StepCheck
from .store import BlockState, DenseStore, Pending, Pushed

# Shards on a GPU: complete sync steps are applied together once a quarter of the server's bytes
# are due, once no worker has said that more pushes follow, or after this many seconds.
APPLY_SHARE = 4
APPLY_WAIT = 0.005


class Policy:
    """What every mode shares, with async semantics; ``Async`` is this, the others override."""

    def __init__(self, membership: Membership, store: DenseStore, io: DeviceIO):
        self.membership = membership
        self.store = store
        self.io = io
        self.pushes = 0  # received

    def push(self, state: BlockState, pushed: Pushed, rank: int, step: int = -1) -> None:
        """Apply or keep one worker's push of a block (``step``: which of the worker's steps it belongs to)."""
        self.pushes += 1
        state.clocks[rank] += 1
        self.io.order_after_upload(pushed)
        self.store.apply([(state, pushed.grads)], scale=1.0)
        state.version += 1

    def pull_ready(self, state: BlockState, pending: Pending) -> bool:
        return True

    def impossible(self, state: BlockState, pending: Pending, gone: dict[int, str]) -> Optional[str]:
        """Why this pull can never be answered now that the ``gone`` workers left or died; None if it can."""
        return None

    def start_clock(self, state: BlockState, worker: int) -> int:
        """The clock a worker that joined late starts from."""
        return min((c for w, c in enumerate(state.clocks) if w != worker), default=0)

    def more_follow(self, rank: int, more: bool) -> None:
        """A worker's push said whether more pushes of its exchange follow."""

    def went_on(self, rank: int, step: int) -> list[tuple[BlockState, str]]:
        """A worker sent us its step ``step``: the blocks that can now never complete, and why."""
        return []

    def joined_late(self, worker: int) -> None:
        """A worker joined an elastic job late."""

    def apply_due(self) -> list[BlockState]:
        """Apply what is due; returns the blocks whose pulls may now be answered."""
        return []

    def peers_changed(self) -> list[BlockState]:
        """Workers left or died: apply what no longer waits for them."""
        return []

    @property
    def waiting(self) -> bool:
        """Complete steps wait for their uploads (or for more of them)."""
        return False

    def reset(self) -> None:
        """The blocks were restored from a checkpoint: nothing half-done survives."""

    def counters(self) -> dict[str, int]:
        return {}


class Async(Policy):
    pass


class SSP(Policy):
    def pull_ready(self, state: BlockState, pending: Pending) -> bool:
        gone = self.membership.left_workers | self.membership.departed_workers
        live = [c for w, c in enumerate(state.clocks) if w not in gone]
        slowest = min(live) if live else pending.need_version
        return pending.need_version - slowest <= self.membership.staleness

    def impossible(self, state: BlockState, pending: Pending, gone: dict[int, str]) -> Optional[str]:
        needed = pending.need_version - self.membership.staleness
        for worker, why in gone.items():
            if worker in self.membership.left_workers or self.membership.elastic:
                continue  # a finished or departed worker no longer holds the others back
            if state.clocks[worker] < needed:
                return _never(why, state, worker, pending)
        return None


@dataclass
class _Accum:
    """One sync step's gradients of a block, summed over the workers that pushed it."""
    first: int  # the worker whose push opened it
    first_step: int  # and the step number that push came with
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    contributors: set[int] = field(default_factory=set)
    whole: Optional[torch.Tensor] = None  # the flat sum that ``tensors`` are views of, if every push was whole
    adds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (sum, addend) still to add
    uploads: list = field(default_factory=list)  # events of the uploads of its gradients to the GPU


class Sync(Policy):
    def __init__(self, membership: Membership, store: DenseStore, io: DeviceIO):
        super().__init__(membership, store, io)
        self._due: dict[int, BlockState] = {}  # blocks whose current step is complete
        self._due_since = 0.0
        self._pushes_follow: set[int] = set()  # workers whose last push said that more follow
        self.apply_bursts = 0  # optimizer steps over due blocks
        self.timed_applies = 0  # of them, those that went out because the due blocks waited too long
        self._steps = StepCheck()

    def push(self, state: BlockState, pushed: Pushed, rank: int, step: int = -1) -> None:
        version = state.clocks[rank]
        accum = state.accums.get(version)
        if accum is None:
            accum = state.accums[version] = _Accum(first=rank, first_step=step)
        else:
            self._steps.check_push(state, version, accum.first, accum.first_step, rank, step)
        self.pushes += 1
        state.clocks[rank] += 1
        if pushed.uploaded is not None:
            accum.uploads.append(pushed.uploaded)
        self._accumulate(state, accum, pushed)
        accum.contributors.add(rank)
        self._mark_if_complete(state)

    def _accumulate(self, state: BlockState, accum: _Accum, pushed: Pushed) -> None:
        if pushed.whole is not None and not accum.tensors:
            accum.whole = pushed.whole if pushed.owned else pushed.whole.clone()
            accum.tensors = state.split(accum.whole)
        elif pushed.whole is not None and accum.whole is not None:
            _add(accum, accum.whole, pushed.whole, pushed.owned)
        else:
            for i, grad in pushed.grads.items():
                held = accum.tensors.get(i)
                if held is None:
                    # received host messages and fresh device tensors are ours to keep and sum into
                    accum.tensors[i] = grad if pushed.owned else grad.clone()
                else:
                    _add(accum, held, grad.to(self.store.device, non_blocking=True), pushed.owned)

    def _active_workers(self) -> set[int]:
        """Workers a step waits for: all of them, or in an elastic job those still in it (a worker
        that closed is gone from the sync set exactly like one that died)."""
        everyone = set(range(self.membership.num_workers))
        if not self.membership.elastic:
            return everyone
        return everyone - self.membership.departed_workers - self.membership.left_workers

    def _mark_if_complete(self, state: BlockState) -> None:
        ready = state.accums.get(state.version)
        if ready is not None and self._active_workers() <= ready.contributors:
            if not self._due:
                self._due_since = time.monotonic()
            self._due[state.block.block_id] = state

    def pull_ready(self, state: BlockState, pending: Pending) -> bool:
        return state.version >= pending.need_version

    def impossible(self, state: BlockState, pending: Pending, gone: dict[int, str]) -> Optional[str]:
        if self.membership.elastic:
            return None  # a departed worker no longer holds the others back
        for worker, why in gone.items():
            if state.clocks[worker] < pending.need_version:
                return _never(why, state, worker, pending)
        return None

    def start_clock(self, state: BlockState, worker: int) -> int:
        return state.version

    def went_on(self, rank: int, step: int) -> list[tuple[BlockState, str]]:
        return self._steps.went_on(rank, step, lambda: self._waiting_for(rank))

    def _waiting_for(self, rank: int):
        """The sync steps still waiting for ``rank``'s push."""
        if rank not in self._active_workers():
            return
        for state in self.store.blocks.values():
            accum = state.accums.get(state.version)
            if accum is not None and rank not in accum.contributors:
                yield state, state.version, accum.first, accum.first_step

    def joined_late(self, worker: int) -> None:
        self._steps.joined_late(worker)

    def more_follow(self, rank: int, more: bool) -> None:
        if more:
            self._pushes_follow.add(rank)
        else:
            self._pushes_follow.discard(rank)

    @property
    def waiting(self) -> bool:
        return bool(self._due)

    def _apply_now(self) -> bool:
        """Whether to apply the due blocks now. Shards in host memory: always. On a GPU that a
        worker's backward pass is using, every burst of our kernels costs that pass a switch
        between the two processes (their kernels took 5 ms longer per ResNet-50 step when we
        applied each block as it completed, benchmarks/gpu.py --trace), so while a worker says
        that more of its pushes follow we wait for a quarter of our bytes, or at most APPLY_WAIT."""
        if not self.io.on_gpu or not self._pushes_follow & self._active_workers():
            return True
        if sum(state.block.nbytes for state in self._due.values()) * APPLY_SHARE >= self.store.nbytes:
            return True
        if time.monotonic() - self._due_since < APPLY_WAIT:
            return False
        self.timed_applies += 1
        return True

    def apply_due(self) -> list[BlockState]:
        """Apply the complete steps of the due blocks whose uploads have landed: one sum and one
        optimizer step for all of them (a block with several complete steps goes round once per
        step). The uploads are done, so our kernels run at once without our stream waiting."""
        stepped: list[BlockState] = []
        if not self._due or not self._apply_now():
            return stepped
        while True:
            steps = []
            for block_id, state in list(self._due.items()):
                if all(event.query() for event in state.accums[state.version].uploads):
                    del self._due[block_id]
                    steps.append((state, state.accums.pop(state.version)))
            if not steps:
                return stepped
            adds = [pair for _, accum in steps for pair in accum.adds]
            if adds:
                torch._foreach_add_([total for total, _ in adds], [addend for _, addend in adds])
            by_scale: dict[float, list] = {}
            for state, accum in steps:
                # the mean over those who pushed: equal to all workers unless an elastic job shrank
                by_scale.setdefault(1.0 / len(accum.contributors), []).append((state, accum.tensors))
            for scale, group in by_scale.items():
                self.store.apply(group, scale)
                self.apply_bursts += 1
            for state, _ in steps:
                state.version += 1
                self._mark_if_complete(state)
                stepped.append(state)

    def peers_changed(self) -> list[BlockState]:
        for state in self.store.blocks.values():
            self._mark_if_complete(state)
        return self.apply_due()

    def reset(self) -> None:
        self._due.clear()
        self._steps.reset()

    def counters(self) -> dict[str, int]:
        return {"apply_bursts": self.apply_bursts, "timed_applies": self.timed_applies}


def _add(accum: _Accum, total: torch.Tensor, addend: torch.Tensor, owned: bool) -> None:
    """Sum now what the worker will reuse; what is ours is summed with the others in one go."""
    if owned:
        accum.adds.append((total, addend))
    else:
        total.add_(addend)


def _never(why: str, state: BlockState, worker: int, pending: Pending) -> str:
    return (f"{why} after {state.clocks[worker]} pushes to block {state.block.block_id}, so this "
            f"worker's wait for clock {pending.need_version} can never be satisfied")


def policy_for(mode: str, membership: Membership, store: DenseStore, io: DeviceIO) -> Policy:
    return {"sync": Sync, "async": Async, "ssp": SSP}[mode](membership, store, io)


__all__ = ["Async", "Policy", "SSP", "Sync", "policy_for"]
