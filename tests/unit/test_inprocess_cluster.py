"""Node logic through the in-process transport: the whole cluster in threads, no sockets."""

from __future__ import annotations

import threading

import pytest
import torch

import psframework as ps
from psframework.config import NodeConfig, SchedulerConfig, Timing
from psframework.scheduler import Scheduler
from psframework.server import Server
from psframework.transport import MemoryTransport
from psframework.worker import Worker
from tests.threads import run_in_threads

TIMING = Timing(heartbeat_interval=0.05, heartbeat_timeout=1.0, start_timeout=10)


@pytest.fixture
def cluster():
    """Start a scheduler and servers in threads; yields a function that makes workers in threads."""
    transport = MemoryTransport()
    threads = []

    def start(num_workers, num_servers=2, mode="sync", staleness=2, chunk_bytes=64):
        config = SchedulerConfig(num_workers=num_workers, num_servers=num_servers, mode=mode,
                                 staleness=staleness, chunk_bytes=chunk_bytes, timing=TIMING)
        scheduler = Scheduler(config, transport=transport)
        nodes = [scheduler.run] + [Server(NodeConfig(scheduler=scheduler.address, device="cpu"),
                                          transport=transport).serve for _ in range(num_servers)]
        for target in nodes:
            threads.append(threading.Thread(target=target, daemon=True))
            threads[-1].start()
        return scheduler.address

    yield transport, start
    for t in threads:
        t.join(5)
    assert not any(t.is_alive() for t in threads), "a node thread did not stop after the workers closed"


def run_workers(transport, address, n, body):
    def one(_):
        with Worker(NodeConfig(scheduler=address), transport=transport) as worker:
            return worker.rank, body(worker)

    return dict(run_in_threads(n, one, timeout=30))


def test_sync_mean_of_workers_with_partial_push(cluster):
    transport, start = cluster
    address = start(num_workers=2)

    def body(worker):
        params = {"a": torch.zeros(50), "b": torch.zeros(3)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        # only "a" is pushed; "b" must stay untouched (torch skips params without grads)
        worker.push_pull({"a": torch.full((50,), float(worker.rank + 1))}, into=params).wait(timeout=10)
        worker.pull(params).wait(timeout=10)
        return params

    results = run_workers(transport, address, 2, body)
    for params in results.values():
        assert torch.equal(params["a"], torch.full((50,), -1.5))
        assert torch.equal(params["b"], torch.zeros(3))


def test_pull_in_sync_waits_for_own_pushes_only(cluster):
    transport, start = cluster
    address = start(num_workers=1, num_servers=1)

    def body(worker):
        params = {"x": torch.ones(4)}
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        fresh = torch.zeros(4)
        worker.pull({"x": fresh}).wait(timeout=5)
        assert torch.equal(fresh, torch.ones(4))
        worker.push({"x": torch.ones(4)}).wait(timeout=5)
        worker.pull({"x": fresh}).wait(timeout=5)
        return fresh

    assert torch.equal(run_workers(transport, address, 1, body)[0], torch.full((4,), 0.5))


def test_non_contiguous_destination_is_filled(cluster):
    transport, start = cluster
    address = start(num_workers=1, num_servers=2)

    def body(worker):
        base = torch.arange(12.0).reshape(3, 4)
        worker.register({"m": base.clone()}, optimizer=ps.optim.SGD(lr=1.0))
        target = torch.zeros(4, 3).t()  # a transposed view: not contiguous
        worker.pull({"m": target}).wait(timeout=5)
        return target

    assert torch.equal(run_workers(transport, address, 1, body)[0], torch.arange(12.0).reshape(3, 4))


def test_unregistered_use_is_a_clear_error(cluster):
    transport, start = cluster
    address = start(num_workers=1, num_servers=1)

    def body(worker):
        with pytest.raises(ps.ConfigError, match="register"):
            worker.push({"x": torch.ones(1)})
        with pytest.raises(ps.ConfigError, match="optimizer"):
            worker.register({"x": torch.ones(1)})
        with pytest.raises(ps.ConfigError, match="floating"):
            worker.register({"i": torch.ones(2, dtype=torch.int64)}, optimizer=ps.optim.SGD(lr=1))
        worker.register([("x", torch.ones(1))], optimizer=ps.optim.SGD(lr=1))
        return True

    assert run_workers(transport, address, 1, body)[0]


def test_closed_worker_refuses_calls(cluster):
    transport, start = cluster
    address = start(num_workers=1, num_servers=1)
    worker = Worker(NodeConfig(scheduler=address), transport=transport)
    worker.close()
    worker.close()  # idempotent
    with pytest.raises(ps.ClosedError):
        worker.barrier()
