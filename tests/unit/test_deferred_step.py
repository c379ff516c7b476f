"""``DistributedOptimizer`` without overlap leaves a device-ordered step to complete on the GPU
and takes its answers in later (``_unfinished``): a rollback found then must drop exactly one
step and pull the restored values, whichever of ``step_count``, ``step()`` or ``close()`` finds it.
Stand-ins for the worker and the step's future: no cluster, no GPU."""

from __future__ import annotations

import torch

from psframework.errors import RolledBackError
from psframework.training import DistributedOptimizer


class _Future:
    def __init__(self, error=None):
        self.error, self.waited = error, 0
        self.ordered_on_device = True

    def wait(self, timeout=None):
        self.waited += 1
        if self.error is not None:
            raise self.error


class _Client:
    rollback = 0


class _Worker:
    def __init__(self):
        self.rank, self.steps, self.pulls, self.push_pulls, self.closed = 0, 7, 0, 0, False
        self.client = _Client()

    def pull(self, params):
        self.pulls += 1
        return _Future()

    def push_pull(self, grads, into, device_ordered=False):
        self.push_pulls += 1
        return _Future()

    def close(self):
        self.closed = True


def _optimizer(unfinished) -> DistributedOptimizer:
    opt = object.__new__(DistributedOptimizer)  # the state __init__ leaves, without registering
    opt.worker, opt._owns_worker = _Worker(), False
    opt.params = {"w": torch.zeros(2, requires_grad=True)}
    opt._tables, opt._overlap, opt._rolled_back, opt._unfinished = None, None, None, unfinished
    opt._shared = None  # no gradients in shared memory
    opt.checkpoint_dir, opt.checkpoint_every, opt.start_step = None, None, 0
    return opt


def test_a_rollback_found_by_step_count_drops_the_next_step_and_pulls_the_restored_values():
    unfinished = _Future(RolledBackError("went back", step=4))
    opt = _optimizer(unfinished)
    assert opt.step_count == 7
    assert unfinished.waited == 1 and opt._unfinished is None
    assert opt._rolled_back == 4
    opt.step()  # its gradients belong to the model before the rollback
    assert opt.worker.push_pulls == 0 and opt.worker.pulls == 1
    assert opt._rolled_back is None
    opt.step()  # the next one is a step again, left to complete on the GPU
    assert opt.worker.push_pulls == 1 and opt._unfinished is not None


def test_a_rollback_found_by_step_drops_that_step_only():
    opt = _optimizer(_Future(RolledBackError("went back", step=4)))
    opt.step()
    assert opt.worker.push_pulls == 0 and opt.worker.pulls == 1 and opt._rolled_back is None
    opt.step()
    assert opt.worker.push_pulls == 1


def test_close_takes_the_last_step_in_and_a_rollback_there_is_no_error():
    unfinished = _Future(RolledBackError("went back", step=4))
    opt = _optimizer(unfinished)
    opt.close()
    assert unfinished.waited == 1 and opt._unfinished is None


def test_a_finished_step_is_waited_for_once():
    unfinished = _Future()
    opt = _optimizer(unfinished)
    assert opt.step_count == 7 and opt.step_count == 7
    assert unfinished.waited == 1 and opt._rolled_back is None
