"""Consistency policies: what a push does to a unit, and when a pull may be answered.

A *unit* is what workers push to and pull from with one clock: a dense block (``BlockState``) or
the rows of the embedding tables a server holds (``RowChannel``). Each has ``clocks`` (pushes of
each worker), a ``version`` (updates applied), ``accums`` (sync steps being gathered), waiting
``pulls``, and the ``store`` that sums and applies its gradients. One policy is chosen from the
job's mode when the server joins (``policy_for``):

- ``Sync``: a step's update is applied once every worker the step waits for pushed it (the mean
  gradient); a worker's pull is answered once all of its own pushes are applied.
- ``Async``: every push is applied as it arrives; pulls answer at once.
- ``SSP``: like async, but a worker's pull waits until it is at most ``staleness`` pushes ahead
  of the slowest live worker.

A policy never touches sockets or lanes, nor the tensors themselves: the stores do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from ..metrics import Recorder
from ..node import Membership
from .steps import StepCheck

Unit = Any  # BlockState or RowChannel: see the module docstring
Units = Callable[[], Iterable[Unit]]

# Shards on a GPU: complete sync steps are applied together once no worker has said that more
# pushes follow, once every block is due (or, while gradients are uploaded from host memory, a
# quarter of the server's bytes), or after this many seconds.
APPLY_SHARE = 4
APPLY_WAIT = 0.005


@dataclass
class Accum:
    """One sync step of a unit being gathered: who pushed, and the store's running sum (``data``)."""
    first: int  # the worker whose push opened it
    first_step: int  # and the step number that push came with
    contributors: set[int] = field(default_factory=set)
    uploads: list = field(default_factory=list)  # events of the uploads of its gradients to the GPU
    data: Any = None


class Policy:
    """What every mode shares, with async semantics; ``Async`` is this, the others override."""

    # whether the workers of our host may read answers straight from our shared values: only where
    # a block never changes while a worker that was answered reads it (``datapath/values.py``)
    shares_values = False

    def __init__(self, membership: Membership, units: Units, on_gpu: bool = False,
                 recorder: Optional[Recorder] = None):
        self.membership = membership
        self.units = units
        self.on_gpu = on_gpu
        self.recorder = recorder or Recorder()
        self.pushes = 0  # received

    def push(self, unit: Unit, pushed: Any, rank: int, step: int = -1) -> None:
        """Apply or keep one worker's push (``step``: which of the worker's steps it belongs to)."""
        self.pushes += 1
        self.recorder.observe("psframework_server_staleness_steps", max(unit.clocks) - unit.clocks[rank])
        unit.clocks[rank] += 1
        unit.store.apply_now(unit, pushed)
        unit.version += 1

    def pull_ready(self, unit: Unit, pending: Any) -> bool:
        return True

    def impossible(self, unit: Unit, pending: Any, gone: dict[int, str]) -> Optional[str]:
        """Why this pull can never be answered now that the ``gone`` workers left or died; None if it can."""
        return None

    def start_clock(self, unit: Unit, worker: int) -> int:
        """The clock a worker that joined late starts from."""
        return min((c for w, c in enumerate(unit.clocks) if w != worker), default=0)

    def more_follow(self, rank: int, more: bool) -> None:
        """A worker's push said whether more pushes of its exchange follow."""

    def went_on(self, rank: int, step: int) -> list[tuple[Unit, str]]:
        """A worker sent us its step ``step``: the units that can now never complete, and why."""
        return []

    def joined_late(self, worker: int) -> None:
        """A worker joined an elastic job late."""

    def apply_due(self) -> list[Unit]:
        """Apply what is due; returns the units whose pulls may now be answered."""
        return []

    def peers_changed(self) -> list[Unit]:
        """Workers left or died: apply what no longer waits for them."""
        return []

    @property
    def waiting(self) -> bool:
        """Complete steps wait for their uploads (or for more of them)."""
        return False

    def reset(self) -> None:
        """The units were restored from a checkpoint: nothing half-done survives."""

    def counters(self) -> dict[str, int]:
        return {}


class Async(Policy):
    pass


class SSP(Policy):
    def pull_ready(self, unit: Unit, pending: Any) -> bool:
        gone = self.membership.left_workers | self.membership.departed_workers
        live = [c for w, c in enumerate(unit.clocks) if w not in gone]
        slowest = min(live) if live else pending.need_version
        return pending.need_version - slowest <= self.membership.staleness

    def impossible(self, unit: Unit, pending: Any, gone: dict[int, str]) -> Optional[str]:
        needed = pending.need_version - self.membership.staleness
        for worker, why in gone.items():
            if worker in self.membership.left_workers or self.membership.elastic:
                continue  # a finished or departed worker no longer holds the others back
            if unit.clocks[worker] < needed:
                return _never(why, unit, worker, pending)
        return None


class Sync(Policy):
    shares_values = True

    def __init__(self, membership: Membership, units: Units, on_gpu: bool = False,
                 total_bytes: Callable[[], int] = lambda: 0, recorder: Optional[Recorder] = None):
        super().__init__(membership, units, on_gpu, recorder)
        self._total_bytes = total_bytes
        self._due: dict[Any, Unit] = {}  # units whose current step is complete
        self._due_since = 0.0
        self._pushes_follow: set[int] = set()  # workers whose last push said that more follow
        self.apply_bursts = 0  # optimizer steps over due units
        self.timed_applies = 0  # of them, those that went out because the due units waited too long
        self._steps = StepCheck()

    def push(self, unit: Unit, pushed: Any, rank: int, step: int = -1) -> None:
        version = unit.clocks[rank]
        accum = unit.accums.get(version)
        if accum is None:
            self._steps.check_new_step(unit, version, rank, step, self._active_workers())
            accum = unit.accums[version] = Accum(first=rank, first_step=step)
        else:
            self._steps.check_push(unit, version, accum.first, accum.first_step, rank, step)
        self.pushes += 1
        unit.clocks[rank] += 1
        if getattr(pushed, "uploaded", None) is not None:
            accum.uploads.append(pushed.uploaded)
        unit.store.accumulate(unit, accum, pushed)
        accum.contributors.add(rank)
        self._mark_if_complete(unit)

    def _active_workers(self) -> set[int]:
        """Workers a step waits for: all of them, or in an elastic job those still in it (a worker
        that closed is gone from the sync set exactly like one that died)."""
        everyone = set(range(self.membership.num_workers))
        if not self.membership.elastic:
            return everyone
        return everyone - self.membership.departed_workers - self.membership.left_workers

    def _mark_if_complete(self, unit: Unit) -> None:
        ready = unit.accums.get(unit.version)
        if ready is not None and self._active_workers() <= ready.contributors:
            if not self._due:
                self._due_since = time.monotonic()
            self._due[unit.key] = unit

    def pull_ready(self, unit: Unit, pending: Any) -> bool:
        return unit.version >= pending.need_version

    def impossible(self, unit: Unit, pending: Any, gone: dict[int, str]) -> Optional[str]:
        if self.membership.elastic:
            return None  # a departed worker no longer holds the others back
        for worker, why in gone.items():
            if unit.clocks[worker] < pending.need_version:
                return _never(why, unit, worker, pending)
        return None

    def start_clock(self, unit: Unit, worker: int) -> int:
        return unit.version

    def went_on(self, rank: int, step: int) -> list[tuple[Unit, str]]:
        return self._steps.went_on(rank, step, lambda: self._waiting_for(rank))

    def _waiting_for(self, rank: int):
        """The sync steps still waiting for ``rank``'s push."""
        if rank not in self._active_workers():
            return
        for unit in self.units():
            accum = unit.accums.get(unit.version)
            if accum is not None and rank not in accum.contributors:
                yield unit, unit.version, accum.first, accum.first_step

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
        """Whether to apply the due units now. Shards in host memory: always. On a GPU that a
        worker's backward pass is using, every burst of our kernels costs that pass a switch
        between the two processes (their kernels took 5 ms longer per ResNet-50 step when we
        applied each block as it completed, benchmarks/gpu.py --trace), so while a worker says
        that more of its pushes follow we wait for every block, or at most APPLY_WAIT. Gradients
        uploaded from host memory arrive slowly enough that applying a quarter of our bytes at a
        time overlaps the rest of the uploads; those of device lanes are on our GPU already, and
        one burst for the whole exchange costs the least (benchmarks/RESULTS_GPU.md, tenth round)."""
        if not self.on_gpu or not self._pushes_follow & self._active_workers():
            return True
        uploading = any(unit.accums[unit.version].uploads for unit in self._due.values())
        if sum(unit.size for unit in self._due.values()) * (APPLY_SHARE if uploading else 1) >= self._total_bytes():
            return True
        if time.monotonic() - self._due_since < APPLY_WAIT:
            return False
        self.timed_applies += 1
        return True

    def apply_due(self) -> list[Unit]:
        """Apply the complete steps of the due units whose uploads have landed, each store's
        together (dense blocks: one sum and one optimizer step for all of them); a unit with
        several complete steps goes round once per step. The uploads are done, so our kernels
        run at once without our stream waiting."""
        stepped: list[Unit] = []
        if not self._due or not self._apply_now():
            return stepped
        while True:
            by_store: dict[int, tuple[Any, list]] = {}
            for key, unit in list(self._due.items()):
                if all(event.query() for event in unit.accums[unit.version].uploads):
                    del self._due[key]
                    steps = by_store.setdefault(id(unit.store), (unit.store, []))[1]
                    steps.append((unit, unit.accums.pop(unit.version)))
            if not by_store:
                return stepped
            for store, steps in by_store.values():
                self.apply_bursts += store.apply_steps(steps)
                for unit, _ in steps:
                    unit.version += 1
                    self._mark_if_complete(unit)
                    stepped.append(unit)

    def peers_changed(self) -> list[Unit]:
        for unit in self.units():
            self._mark_if_complete(unit)
        return self.apply_due()

    def reset(self) -> None:
        self._due.clear()
        self._steps.reset()

    def counters(self) -> dict[str, int]:
        return {"apply_bursts": self.apply_bursts, "timed_applies": self.timed_applies}


def _never(why: str, unit: Unit, worker: int, pending: Any) -> str:
    return (f"{why} after {unit.clocks[worker]} pushes to {unit.describe()}, so this worker's wait for "
            f"clock {pending.need_version} can never be satisfied")


def policy_for(mode: str, membership: Membership, units: Units, on_gpu: bool,
               total_bytes: Callable[[], int], recorder: Optional[Recorder] = None) -> Policy:
    if mode == "sync":
        return Sync(membership, units, on_gpu, total_bytes, recorder)
    return {"async": Async, "ssp": SSP}[mode](membership, units, on_gpu, recorder)


__all__ = ["Accum", "Async", "Policy", "SSP", "Sync", "policy_for"]
