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
