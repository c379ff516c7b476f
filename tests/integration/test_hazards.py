"""Hazards a review found: waits that could hang, work that could be lost. Each test failed before
its fix."""

from __future__ import annotations

import time

import pytest
import torch

import psframework as ps
from tests.threads import run_in_threads


def _sgd_worker(cluster, params=None):
    worker = ps.init(scheduler=cluster.scheduler)
    params = params if params is not None else {"w": torch.zeros(10)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    return worker, params


# ---------------------------------------------------------------------------------------- hangs


def test_elastic_sync_goes_on_without_a_worker_that_closed(make_cluster):
    """Worker 1 takes one step and closes; worker 0's later steps are answered, averaged over
    the workers still in the job."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="sync", elastic=True)

    def work(_):
        worker, params = _sgd_worker(cluster)
        with worker:
            for _ in range(1 if worker.rank == 1 else 3):
                worker.push_pull({"w": torch.full((10,), float(worker.rank + 1))}, into=params).wait(timeout=10)
            return worker.rank, params["w"].clone()

    results = dict(run_in_threads(2, work, timeout=60))
    # step 1: the mean of 1 and 2; steps 2 and 3: worker 0 alone
    assert torch.equal(results[0], torch.full((10,), -(1.5 + 1 + 1)))


def test_register_fails_clearly_when_a_worker_closes_without_registering(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=2)

    def work(i):
        worker = ps.init(scheduler=cluster.scheduler)
        if worker.rank == 1:
            time.sleep(0.5)
            worker.close()
            return None
        start = time.monotonic()
        with worker, pytest.raises(ps.PSError) as info:
            worker.register({"w": torch.zeros(10)}, optimizer=ps.optim.SGD(lr=1.0))
        return str(info.value), time.monotonic() - start

    message, seconds = [r for r in run_in_threads(2, work, timeout=60) if r is not None][0]
    assert "worker 1" in message and "before registering" in message, message
    assert seconds < 10


def test_elastic_register_completes_among_the_live_workers(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=3, elastic=True)

    def work(i):
        worker = ps.init(scheduler=cluster.scheduler)
        if worker.rank == 2:
            worker.close()  # gone before registering: the others go on without it
            return None
        with worker:
            params = {"w": torch.zeros(10)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            worker.push_pull({"w": torch.full((10,), float(worker.rank + 1))}, into=params).wait(timeout=10)
            return params["w"].clone()

    results = [r for r in run_in_threads(3, work, timeout=60) if r is not None]
    assert len(results) == 2
    for w in results:
        assert torch.equal(w, torch.full((10,), -1.5))


def test_sync_workers_pushing_different_tensors_get_an_error_naming_them(make_cluster):
    """Worker 1 leaves tensor "b" out of its steps: worker 0's wait for "b" ends in an error that
    names the block and both workers, not in a hang."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync")

    def work(i):
        worker = ps.init(scheduler=cluster.scheduler)
        params = {"a": torch.zeros(10), "b": torch.zeros(10)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        keys = ["a", "b"] if worker.rank == 0 else ["a"]
        start = time.monotonic()
        try:
            for _ in range(3):
                grads = {k: torch.ones(10) for k in keys}
                worker.push_pull(grads, into={k: params[k] for k in keys}).wait(timeout=20)
        except ps.PSError as exc:
            return worker.rank, str(exc), time.monotonic() - start
        finally:
            worker.close()
        return worker.rank, None, time.monotonic() - start

    results = {rank: (message, seconds) for rank, message, seconds in run_in_threads(2, work, timeout=60)}
    message, seconds = results[0]
    assert message is not None and seconds < 10
    assert "'b'" in message and "worker 0" in message and "worker 1" in message, message
    assert "the same tensors" in message, message


# ---------------------------------------------------------------------------------------- counting


def test_steps_are_counted_once_with_overlap(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=4096)
    result = worker_procs(cluster, "count_steps", 1, steps=5).join()[0]
    assert result == {"step_count": 5, "worker_steps": 5, "heartbeat_steps": 5}
