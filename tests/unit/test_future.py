"""A future's callbacks: ``before_done`` runs once every request is answered, failed or not."""

from __future__ import annotations

from psframework.errors import PSError
from psframework.worker.requests import Future


def test_before_done_runs_once_all_are_answered_and_sealed_and_its_error_is_the_futures():
    future = Future(client=None).unsealed()
    ran, completed = [], []
    future.before_done(lambda: ran.append(1) or PSError("the copies out failed"))
    future.on_complete(lambda: completed.append(1))
    future.expect()
    future.expect()
    future.resolve()
    future.resolve()
    assert ran == []  # more requests may still join
    future.seal()
    assert ran == [1] and completed == []
    assert str(future._error) == "the copies out failed"


def test_before_done_runs_after_a_failed_request_too_and_keeps_the_first_error():
    future = Future(client=None)
    seen = []
    future.before_done(lambda: seen.append(future.discards))
    future.expect()
    future.resolve(PSError("server 0 refused"))
    assert seen == [True] and str(future._error) == "server 0 refused"


def test_an_abandoned_future_completes_without_its_callbacks_or_finalizers():
    """What an abandoned exchange sent is still answered (``before_done`` frees its slots), but it
    did not happen: no step is counted and nothing is written into the caller's tensors."""
    future = Future(client=_Done()).unsealed()
    ran, completed, finalized = [], [], []
    future.before_done(lambda: ran.append(1))
    future.on_complete(lambda: completed.append(1))
    future.add_finalizer(lambda: finalized.append(1))
    future.expect()
    future.abandon()
    future.seal()
    future.resolve()
    future.wait(timeout=1)
    assert ran == [1] and completed == [] and finalized == []


class _Done:
    """A client whose waits return at once (the future is already complete)."""

    def wait_until(self, done, timeout):
        assert done()


def test_tensors_servers_use_where_they_lie_are_kept_until_the_waits_for_their_device_work_ran():
    """A direct request's tensors (``Future.kept``) outlive the answers: a GPU server answers once
    its work is queued, and ``before_done`` waits for that work; only then may they be freed."""
    import weakref

    import torch

    future = Future(client=None).unsealed()
    gradient = torch.ones(4)
    alive = weakref.ref(gradient)
    future.kept.append(gradient)
    del gradient
    seen = []
    future.before_done(lambda: seen.append(alive() is not None))
    future.expect()
    future.resolve()
    assert alive() is not None  # answered, but not sealed: more requests may join
    future.seal()
    assert seen == [True] and alive() is None
