"""Sync jobs: every worker must push the same blocks in every step.

A worker numbers its pushing steps and sends the number with each push (and a ``Mark`` to the
servers a step pushes nothing to). A sync step of a block remembers the step number its first
push came with. Two ways show that the workers push different tensors (a conditional branch of
the model, a tensor left out of ``push_pull``), which would otherwise mix the gradients of
different steps or wait forever:

- a worker's push of the block comes with another step number than the step's first push;
- a worker that the step still waits for is seen at a later step number: it went on without it.

Workers that joined an elastic job late count their steps from another start, so they are not
compared until a restore lines everyone up again.
"""

from __future__ import annotations

from typing import Callable, Iterable

from typing import Any

from .. import protocol as P

BlockState = Any  # a unit of policy.py: a dense block or a server's table rows


_ADVICE = ("in sync mode every worker must push the same tensors in every step (ps.DistributedOptimizer "
           "does, also for parameters without a gradient)")


class StepCheck:
    def __init__(self) -> None:
        self._latest: dict[int, int] = {}  # worker -> the highest step number it sent us
        self._late: set[int] = set()  # workers whose step numbers do not line up with the others'

    def joined_late(self, worker: int) -> None:
        self._late.add(worker)

    def reset(self) -> None:
        """A restore lines every worker's step numbers up again."""
        self._latest.clear()
        self._late.clear()

    def _comparable(self, *workers: int) -> bool:
        return not any(w in self._late for w in workers)

    def check_push(self, state: BlockState, version: int, first: int, first_step: int, rank: int,
                   step: int) -> None:
        """``Rejected`` if ``rank``'s push of a sync step belongs to another of its steps than the first push's."""
        if step < 0 or first_step < 0 or step == first_step or not self._comparable(first, rank):
            return
        raise P.Rejected(P.CONFIG, f"worker {rank} pushed {state.describe()} in its step {step}, but worker "
                                   f"{first} pushed its sync step {version} in its step {first_step}: {_ADVICE}")

    def check_new_step(self, state: BlockState, version: int, rank: int, step: int, others: Iterable[int]) -> None:
        """``Rejected`` if ``rank``'s push opens sync step ``version`` of a block that a worker of
        ``others`` will never push: it sent us a later step already (``went_on``'s case, where that
        worker's later step came first)."""
        if step < 0:
            return
        for worker in others:
            latest = self._latest.get(worker, -1)
            if worker != rank and latest > step and self._comparable(rank, worker):
                raise P.Rejected(P.CONFIG, f"worker {rank} pushed {state.describe()} in its step {step} (sync step "
                                           f"{version}), but worker {worker} went on to its step {latest} without "
                                           f"pushing it: {_ADVICE}")

    def went_on(self, rank: int, step: int, waiting: Callable[[], Iterable[tuple[BlockState, int, int, int]]]
                ) -> list[tuple[BlockState, str]]:
        """``rank`` sent us its step ``step``. ``waiting()`` gives the sync steps still waiting for it
        as (block, version, first worker, its step number); those from earlier steps of the first
        worker than ``step`` will never get ``rank``'s push: the blocks and why."""
        if step < 0 or step <= self._latest.get(rank, -1):
            return []
        self._latest[rank] = step
        failed = []
        for state, version, first, first_step in waiting():
            if 0 <= first_step < step and self._comparable(first, rank):
                failed.append((state, f"sync step {version} of {state.describe()} has worker {first}'s push from "
                                      f"its step {first_step}, but worker {rank} went on to its step {step} without "
                                      f"pushing it: {_ADVICE}"))
        return failed


__all__ = ["StepCheck"]
