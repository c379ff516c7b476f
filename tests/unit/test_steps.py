"""Sync steps: workers that push different tensors are told so (``server/steps.py``)."""

from __future__ import annotations

import pytest

from psframework import protocol as P
from psframework.server.steps import StepCheck


class _Block:
    def describe(self) -> str:
        return "block 3 ('b')"


def test_a_push_opening_a_step_that_another_worker_went_past_is_refused():
    """Worker 1's step 1 reached this server before worker 0's push of 'b' from step 0, which
    worker 1 never pushed: the push is refused with both workers named (it used to wait forever)."""
    steps = StepCheck()
    assert steps.went_on(1, 1, lambda: []) == []
    with pytest.raises(P.Rejected) as caught:
        steps.check_new_step(_Block(), 0, rank=0, step=0, others=[0, 1])
    message = str(caught.value)
    assert "'b'" in message and "worker 0" in message and "worker 1 went on to its step 1" in message
    assert "the same tensors" in message
    steps.check_new_step(_Block(), 1, rank=0, step=1, others=[0, 1])  # the same step: fine
    steps.check_new_step(_Block(), 0, rank=0, step=0, others=[0])  # worker 1 is not waited for


def test_a_late_joiners_steps_are_not_compared():
    steps = StepCheck()
    steps.went_on(1, 7, lambda: [])
    steps.joined_late(1)
    steps.check_new_step(_Block(), 0, rank=0, step=0, others=[0, 1])
