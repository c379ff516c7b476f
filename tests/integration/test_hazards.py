"""Hazards a review found: waits that could hang, work that could be lost. Each test failed before
its fix."""

from __future__ import annotations

import time

import pytest
import torch

import psframework as ps
from tests.integration import models
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


@pytest.mark.parametrize("how", ["closes", "is killed"])
def test_elastic_register_completes_among_the_live_workers(make_cluster, how):
    """Worker 0 (a thread that closes, or a process that is SIGKILLed) goes while workers 1 and 2
    wait in register(): their registration completes among the live workers, worker 1's values
    initialise the servers, and their first step is the mean of theirs."""
    import os
    import signal
    import subprocess
    import sys

    from psframework.procs import spawn

    cluster = make_cluster(num_servers=1, num_workers=3, elastic=True)
    doomed = None
    if how == "is killed":
        doomed = spawn([sys.executable, "-c", "import time, psframework as ps; ps.init(); time.sleep(60)"],
                       cluster.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_joined_workers(cluster, 1)  # it is worker 0

    def work(i):
        worker = ps.init(scheduler=cluster.scheduler)
        if worker.rank == 0:
            time.sleep(1.0)  # the others are waiting in register() by now
            worker.close()
            return None
        if doomed is not None and worker.rank == 1:
            _wait_for_joined_workers(cluster, 3)
            time.sleep(1.0)
            os.kill(doomed.pid, signal.SIGKILL)
        with worker:
            params = {"w": torch.zeros(10)}
            started = time.monotonic()
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            waited = time.monotonic() - started
            worker.push_pull({"w": torch.full((10,), float(worker.rank + 1))}, into=params).wait(timeout=10)
            return worker.rank, params["w"].clone(), waited

    try:
        results = [r for r in run_in_threads(2 if doomed is not None else 3, work, timeout=60) if r is not None]
    finally:
        if doomed is not None:
            doomed.kill()
            doomed.wait(timeout=5)
    assert len(results) == 2
    for rank, w, waited in results:
        assert 0.8 < waited < 15, f"worker {rank} waited {waited:.1f} s in register()"
    assert sorted(rank for rank, _, _ in results) == [1, 2]
    for _, w, _ in results:
        assert torch.equal(w, torch.full((10,), -2.5))  # from worker 1's zeros, the mean of 2 and 3


def _wait_for_joined_workers(cluster, count: int) -> None:
    deadline = time.monotonic() + 20
    while cluster.output("scheduler", 200).count("PS_JOINED role=worker") < count:
        assert time.monotonic() < deadline, f"{count} workers never joined"
        time.sleep(0.05)


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


def test_a_stopped_reader_does_not_freeze_the_server(make_cluster, worker_procs):
    """Over TCP a worker stops (SIGSTOP) with a large reply unread: the server must never wait for
    that send before it changes the block, so once the stopped worker is declared gone the other
    two train on at full speed."""
    cluster = make_cluster(num_servers=1, num_workers=3, mode="sync", elastic=True)
    procs = worker_procs(cluster, "stop_while_pulling", 3, env={"PS_SHM": "0"}, victim=2, steps=6, mib=16)
    try:
        results = [procs.join_one(rank, timeout=60) for rank in (0, 1)]
    finally:
        procs.kill(2)
    for result in results:
        assert result["gone"], result
        assert result["after_gone"] < 3.0, result  # 4 steps once the sync set no longer waits for it


def test_closing_an_optimizer_whose_communication_thread_is_stuck_returns(make_cluster, monkeypatch):
    """The overlap thread waits on a peer that lives but never answers: close() interrupts that
    wait instead of giving up on the thread and then hanging in the ZeroMQ context's term()."""
    from psframework.worker.requests import Client

    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    torch.manual_seed(0)
    model = models.OverlapNet()
    opt = ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler))
    worker = opt.worker

    def stuck(self, timeout):
        while True:  # a wait with a liveness check, on a peer that never answers
            self.membership.check()
            time.sleep(0.05)

    monkeypatch.setattr(Client, "progress", stuck)
    x, y = models.overlap_batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()  # the hooks hand the gradients to the thread
    time.sleep(0.3)
    start = time.monotonic()
    opt.close()
    worker.close()
    assert time.monotonic() - start < 10
    assert cluster.wait(timeout=15)["scheduler"] == 0  # the worker said goodbye: nothing took it for dead


# ---------------------------------------------------------------------------------------- losses


@pytest.mark.parametrize("optimizer,overlap", [("sgd", False), ("adam", True), ("sgd", True)])
def test_a_parameter_without_a_gradient_is_not_stepped(make_cluster, worker_procs, optimizer, overlap):
    """As torch.optim skips a None gradient: momentum, weight decay and Adam's state stay untouched
    on the steps where no worker uses the branch; where one worker does, the other counts as zero."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=64)
    results = worker_procs(cluster, "routed_train", 2, optimizer=optimizer, overlap=overlap).join()
    want = models.routed_reference(optimizer)
    for got in results:
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_close_delivers_what_was_pushed_without_waiting(make_cluster, monkeypatch):
    monkeypatch.setenv("PS_SHM", "0")  # the frames, not only a header, must leave before the sockets close
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async")
    n = 8 << 20  # 32 MB: the sockets are closed long before ZeroMQ could have written it all

    def work(i):
        worker, params = _sgd_worker(cluster, {"w": torch.zeros(n)})
        worker.barrier()
        if worker.rank == 1:
            future = worker.push({"w": torch.ones(n)})
            worker.close()
            future.wait(timeout=1)  # done: close waited for its answer
            return 1, None
        with worker:
            deadline = time.monotonic() + 15
            while params["w"][-1].item() != -1.0 and time.monotonic() < deadline:
                worker.pull(params).wait(timeout=10)
                time.sleep(0.05)
            return 0, params["w"].clone()

    w = dict(run_in_threads(2, work, timeout=60))[0]
    assert torch.equal(w, torch.full((n,), -1.0))


def test_close_fails_what_it_could_not_deliver(make_cluster, monkeypatch):
    import os
    import signal

    monkeypatch.setenv("PS_SHM", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    worker, params = _sgd_worker(cluster)
    server = cluster.processes()["server-0"]
    os.kill(server.pid, signal.SIGSTOP)
    try:
        future = worker.push({"w": torch.ones(10)})
        start = time.monotonic()
        worker.close(timeout=0.5)
        assert time.monotonic() - start < 3
    finally:
        os.kill(server.pid, signal.SIGCONT)
    with pytest.raises(ps.ClosedError, match="server 0"):
        future.wait(timeout=1)


@pytest.mark.parametrize("shm", ["1", "0"])
def test_late_replies_of_a_failed_overlapped_step_never_write_the_parameters(make_cluster, monkeypatch, shm):
    """The servers are stopped while backward sends the last layers' blocks; handing over the first
    layer's gradient then fails, so step() raises; the servers' answers that come after must not
    touch the parameters."""
    import os
    import signal

    from psframework.worker.exchange import Exchange

    monkeypatch.setenv("PS_SHM", shm)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=4096)
    torch.manual_seed(0)
    model = models.OverlapNet()
    servers = [p.pid for name, p in cluster.processes().items() if name.startswith("server")]
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.5), ps.init(scheduler=cluster.scheduler)) as opt:
        add = Exchange.add

        def failing_add(self, name, tensor, after=None):
            if name == "first.weight":
                raise RuntimeError("injected failure")
            return add(self, name, tensor, after)

        monkeypatch.setattr(Exchange, "add", failing_add)
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        x, y = models.overlap_batch(0)
        loss = torch.nn.functional.mse_loss(model(x), y)
        for pid in servers:
            os.kill(pid, signal.SIGSTOP)
        try:
            loss.backward()
            with pytest.raises(RuntimeError, match="injected failure"):
                opt.step()
        finally:
            for pid in servers:
                os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            opt.worker.progress(0.1)  # the late answers arrive
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), f"{key} was written by a late reply"


# ---------------------------------------------------------------------------------------- resources


def _rss(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def _flooder(address: str):
    """A peer that sends requests and reads no answer (its ZeroMQ queue holds one, its kernel buffer 4 KiB)."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 1)
    sock.setsockopt(zmq.RCVBUF, 4096)
    sock.connect(address)
    return sock


def test_a_peer_that_floods_without_reading_cannot_grow_a_server_without_bound(make_cluster, monkeypatch):
    """A peer sends hundreds of pulls and pushes of a 4 MiB block and reads none of the answers,
    while a worker's updates change the block: the server holds a bounded amount for it, and the
    worker keeps training."""
    from psframework import protocol as P

    monkeypatch.setenv("PS_SHM", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    worker, params = _sgd_worker(cluster, {"w": torch.zeros(1 << 20)})
    with worker:
        server = cluster.processes()["server-0"].pid
        flood = _flooder(worker.membership.servers[0])
        # a member (it has worker 0's token), so its requests are served, not refused with a short
        # error; without the credit limit (peer_buffer_bytes=1 << 40) the server grows by ~1.2 GiB
        flood.send(P.encode(P.Introduce(rank=0, token=worker.membership.welcome.token)))
        try:
            base = _rss(server)
            payload = torch.ones(1 << 20).numpy().tobytes()
            for i in range(300):
                flood.send(P.encode(P.Pull(req=10**6 + i, block=0, rank=0)))
                worker.push_pull({"w": torch.ones(1 << 20)}, into=params).wait(timeout=30)
                flood.send_multipart([P.encode(P.Push(req=2 * 10**6 + i, block=0, rank=0)), payload])
            peak = _rss(server)
            worker.push_pull({"w": torch.ones(1 << 20)}, into=params).wait(timeout=30)
        finally:
            flood.close()
    assert peak - base < 400 << 20, f"the server grew by {(peak - base) >> 20} MiB for a peer that reads nothing"


def test_answers_beyond_a_peers_buffer_wait_and_arrive_whole(make_cluster, monkeypatch):
    """With 1 MiB of unread answers allowed per peer, a pull of 16 MiB (16 blocks) is answered a
    block at a time as earlier answers leave, every value right."""
    monkeypatch.setenv("PS_SHM", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", peer_buffer_bytes=1 << 20)
    values = torch.arange(4 << 20, dtype=torch.float32)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": values.clone()}, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(3):
            into = torch.zeros_like(values)
            worker.pull({"w": into}).wait(timeout=30)
            assert torch.equal(into, values)
        assert worker.server_stats()[0]["deferred_replies"] > 0


# ---------------------------------------------------------------------------------------- counting


def test_steps_are_counted_once_with_overlap(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=4096)
    result = worker_procs(cluster, "count_steps", 1, steps=5).join()[0]
    assert result == {"step_count": 5, "worker_steps": 5, "heartbeat_steps": 5}
