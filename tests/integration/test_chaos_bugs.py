"""Bugs the chaos benchmark found (benchmarks/RESULTS.md, "What the framework did wrong"), each
reproduced with real processes: servers and workers stopped (SIGSTOP) or killed at the moment that
hurt. Each test failed before its fix."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from typing import Callable, Optional

import pytest
import torch

import psframework as ps
from tests.threads import run_in_threads

CHUNK = 4096
N = 4000  # 16 KB: 4 blocks over two servers


class Background:
    """A call in a thread of its own; ``result()`` re-raises what it raised. A call still running
    at the deadline is interrupted (its waits end with ``ClosedError``), so no thread outlives the test."""

    def __init__(self, call: Callable[[], object], worker: ps.Worker):
        self._worker = worker
        self._outcome: list = []
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call) -> None:
        try:
            self._outcome.append((True, call()))
        except BaseException as exc:  # re-raised by result(), in the test's thread
            self._outcome.append((False, exc))

    def result(self, timeout: float):
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._worker.membership.interrupt()
            self._thread.join(10)
            self._worker.membership.resume()
            raise AssertionError(f"still waiting after {timeout} s")
        ok, value = self._outcome[0]
        if not ok:
            raise value
        return value


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.05)


def declared_dead(cluster: ps.LocalCluster, role: str, rank: int) -> bool:
    return f"PS_DEAD role={role} rank={rank} " in cluster.output("scheduler", 400)


def stop_until_dead(cluster: ps.LocalCluster, name: str, role: str, rank: int) -> None:
    """SIGSTOP a process until the scheduler declares it dead."""
    os.kill(cluster.processes()[name].pid, signal.SIGSTOP)
    wait_for(lambda: declared_dead(cluster, role, rank), 15, f"{name} declared dead")


def restart_server(cluster: ps.LocalCluster, rank: int, name: Optional[str] = None) -> str:
    """Kill a (stopped or live) server process and start a new one for its rank, as ps-launch does."""
    proc = cluster.processes()[name or f"server-{rank}"]
    proc.kill()
    proc.wait(timeout=10)
    return cluster.restart_server(rank)


def push_until_ok(worker: ps.Worker, params: dict, times: int = 1, timeout: float = 30) -> int:
    """``times`` push_pulls of ones that succeed, each after the RolledBackErrors of a rollback;
    returns how many failed."""
    failed = 0
    deadline = time.monotonic() + timeout
    for _ in range(times):
        while True:
            try:
                worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout)
                break
            except ps.RolledBackError:
                failed += 1
                assert time.monotonic() < deadline, "no push succeeded after the rollback"
    return failed


def one_worker(cluster: ps.LocalCluster) -> tuple[ps.Worker, dict]:
    worker, params = ps.init(scheduler=cluster.scheduler), {"big": torch.zeros(N)}
    worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
    return worker, params


def restartable(make_cluster, tmp_path, **kwargs) -> ps.LocalCluster:
    kwargs = {"num_servers": 2, "num_workers": 1, "mode": "async", "chunk_bytes": CHUNK, **kwargs}
    return make_cluster(restart_servers=True, checkpoint_dir=tmp_path / "ckpt", **kwargs)


# ---------------------------------------------------------------------------------------- checkpoints


def test_a_server_dying_during_a_checkpoint_fails_it_and_the_next_one_is_written(make_cluster, tmp_path):
    """Finding 2: server 1 stops while a checkpoint waits for its part and is declared dead; the
    checkpoint fails at once with an error naming it (it used to wait for ever, and every later one
    was refused as "already running"); once the server is back the next checkpoint is written."""
    cluster = restartable(make_cluster, tmp_path)
    root = tmp_path / "ckpt"
    worker, params = one_worker(cluster)
    with worker:
        push_until_ok(worker, params, 2)
        worker.save_checkpoint(root)  # step 2: what the restarted server brings the job back to
        push_until_ok(worker, params)
        try:
            os.kill(cluster.processes()["server-1"].pid, signal.SIGSTOP)
            saving = Background(lambda: worker.save_checkpoint(root), worker)
            wait_for(lambda: declared_dead(cluster, "server", 1), 15, "server 1 declared dead")
            with pytest.raises(ps.CheckpointError, match="server 1 .* died"):
                saving.result(timeout=10)
        finally:
            restart_server(cluster, 1)
        assert push_until_ok(worker, params) >= 1  # the job went back to step 2
        assert worker.steps == 3
        path = worker.save_checkpoint(root)
        assert path.endswith("step-00000003") and (root / "step-00000003" / "manifest.json").exists()


def test_a_checkpoint_never_starts_with_the_part_of_a_dead_worker_in_place_of_a_live_one(make_cluster, worker_procs,
                                                                                           tmp_path):
    """Finding 5: worker 0 hands in its part of a checkpoint and is killed. Once it is declared dead
    its part must not stand for the live worker 1 (the checkpoint used to start with the dead
    worker's part alone, while worker 1 pushed on); worker 1's own checkpoint is then the one written."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True)
    root, flags = tmp_path / "ckpt", tmp_path / "flags"
    flags.mkdir()
    victim = worker_procs(cluster, "checkpoint_part", 1, flag_dir=str(flags), directory=str(root), step=3)
    with ps.init(scheduler=cluster.scheduler, rank=1) as worker:
        worker.register({"w": torch.zeros(2)}, optimizer=ps.optim.SGD(lr=1.0))
        wait_for(lambda: (flags / "saving").exists(), 15, "the victim's checkpoint")
        time.sleep(0.5)  # its part is at the scheduler
        victim.kill(0)
        wait_for(lambda: 0 in worker.membership.departed_workers, 15, "worker 0 declared dead")
        time.sleep(0.5)
        assert not (root / "step-00000003").exists(), "a checkpoint started without the live worker 1"
        path = worker.save_checkpoint(root, step=7)
    manifest = json.loads((root / "step-00000007" / "manifest.json").read_text())
    assert path.endswith("step-00000007") and manifest["worker_steps"] == {"1": 7}


def _two_workers(cluster: ps.LocalCluster) -> tuple[list[ps.Worker], list[dict]]:
    def join(rank: int):
        worker, params = ps.init(scheduler=cluster.scheduler, rank=rank), {"big": torch.zeros(N)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        return worker, params

    return tuple(map(list, zip(*run_in_threads(2, join, timeout=60))))


def _save_together(workers: list[ps.Worker], root) -> list[str]:
    calls = [Background(lambda w=w: w.save_checkpoint(root), w) for w in workers]
    return [call.result(timeout=30) for call in calls]


def test_a_checkpoint_collected_across_a_rollback_is_abandoned(make_cluster, tmp_path):
    """Finding 6: worker 1 hands in its part of the checkpoint of step 4; server 1 is restarted
    and the job goes back to step 2; worker 0 then hands in its part (step 2). That checkpoint used
    to be written as step-00000004 holding the state of step 2; now worker 1's part fails with a
    RolledBackError naming step 2, nothing is written, and the next checkpoint is right."""
    cluster = restartable(make_cluster, tmp_path, num_workers=2)
    root = tmp_path / "ckpt"
    workers, params = _two_workers(cluster)
    try:
        for _ in range(2):
            for w, p in zip(workers, params):
                push_until_ok(w, p)
        _save_together(workers, root)  # step 2: w = -4
        for _ in range(2):
            for w, p in zip(workers, params):
                push_until_ok(w, p)  # in turn: worker 0's last answer had -7
        late = Background(lambda: workers[1].save_checkpoint(root), workers[1])
        time.sleep(0.5)  # its part is at the scheduler
        restart_server(cluster, 1)
        wait_for(lambda: workers[0].membership.rollback == (1, 2), 30, "worker 0 hearing of the rollback")
        early = Background(lambda: workers[0].save_checkpoint(root), workers[0])
        with pytest.raises(ps.RolledBackError) as info:
            late.result(timeout=10)
        assert info.value.step == 2 and not (root / "step-00000004").exists()
        push_until_ok(workers[1], params[1])  # worker 1 goes on from step 2: w = -5
        assert workers[1].save_checkpoint(root).endswith("step-00000003")
        assert early.result(timeout=10).endswith("step-00000003")
        manifest = json.loads((root / "step-00000003" / "manifest.json").read_text())
        assert manifest["worker_steps"] == {"0": 2, "1": 3}
        workers[0].pull(params[0]).wait(timeout=10)
        assert torch.equal(params[0]["big"], torch.full((N,), -5.0)), params[0]["big"]
    finally:
        for w in workers:
            w.close()


def test_the_first_checkpoint_after_a_rollback_never_rewrites_the_one_the_job_went_back_to(make_cluster, tmp_path):
    """Finding 8: right after the job went back to step-00000009 the next checkpoint has step 9 too;
    it used to rewrite step-00000009 in place (a rollback in the middle would find files that do not
    match the manifest). It goes to a directory of its own now, which the next rollback finds first.
    And the rollback's log line never says it went back from a step lower than the one it went to
    (here the worker had reported 5 steps: its checkpoint was given step 9)."""
    cluster = restartable(make_cluster, tmp_path)
    root = tmp_path / "ckpt"
    worker, params = one_worker(cluster)
    with worker:
        push_until_ok(worker, params, 3)
        worker.save_checkpoint(root, step=9)
        push_until_ok(worker, params, 2)
        first = {p.name: p.read_bytes() for p in (root / "step-00000009").iterdir()}
        restart_server(cluster, 1)
        wait_for(lambda: worker.membership.rollback == (1, 9), 30, "the rollback")
        path = worker.save_checkpoint(root)  # step 9 again, nothing pushed since the rollback
        assert path.endswith("step-00000009-1"), path
        assert {p.name: p.read_bytes() for p in (root / "step-00000009").iterdir()} == first
    log = cluster.output("scheduler", 100)
    assert re.search(r"rolled back 0 steps, from about step 9 to step 9: .* reloaded step-00000009$", log, re.M), log


# ---------------------------------------------------------------------------------------- stopped processes


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def stopped_victim(cluster: ps.LocalCluster, worker_procs, tmp_path):
    """Worker 0 runs tests/integration/worker_tasks.py:stop_myself; the caller is worker 1. Once the
    victim stopped itself and was declared dead, it is continued; returns its result and the
    servers' w as worker 1 pulled it just before that."""
    flags = tmp_path / "flags"
    flags.mkdir()
    victim = worker_procs(cluster, "stop_myself", 1, flag_dir=str(flags))
    pid = victim.procs[0].pid
    with ps.init(scheduler=cluster.scheduler, rank=1) as worker:
        params = {"w": torch.zeros(2)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        try:
            wait_for(lambda: (flags / "stopping").exists() and _stopped(pid), 15, "the victim stopping itself")
            wait_for(lambda: 0 in worker.membership.departed_workers, 15, "worker 0 declared dead")
            time.sleep(1.0)  # the server has heard it too
            worker.pull(params).wait(timeout=10)
        finally:
            os.kill(pid, signal.SIGCONT)
        result = victim.join_one(0, timeout=30)
        worker.pull(params).wait(timeout=10)
    return result, params["w"]


def test_a_worker_stopped_past_the_timeout_reads_its_answer_instead_of_blaming_the_scheduler(make_cluster,
                                                                                              worker_procs, tmp_path):
    """Finding 4: a worker stopped (SIGSTOP) for longer than the heartbeat timeout, with the answer
    to its push waiting, used to fail that push with "the scheduler ... has not answered heartbeats
    ... it has probably died": its own stopped time counted as the scheduler's silence, and the
    liveness check came before the answer already there was read. The push was applied."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True)
    result, w = stopped_victim(cluster, worker_procs, tmp_path)
    assert result["check"] is None and result["first"] is None, result
    assert w[1].item() <= -1.0


def test_a_worker_declared_dead_cannot_push_any_more(make_cluster, worker_procs, tmp_path):
    """Finding 3: a worker stopped until it was declared dead is continued and pushes again: the
    server refuses that push, with an error that says so (it used to apply it, on the connection the
    worker had introduced, until another process took the rank)."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True)
    result, w = stopped_victim(cluster, worker_procs, tmp_path)
    assert result["second"] is not None and "worker 0" in result["second"] and "declared dead" in result["second"], \
        result
    assert w.tolist() == [0.0, -1.0]  # its first push only, from before its death


# ---------------------------------------------------------------------------------------- late workers


def _rank_1_free(cluster: ps.LocalCluster, root) -> tuple[ps.Worker, dict]:
    """Workers 0 and 1 push twice each and checkpoint (step 2, w = -4); worker 1 then leaves, so that
    a late worker takes rank 1. Returns worker 0."""
    workers, params = _two_workers(cluster)
    for _ in range(2):
        for w, p in zip(workers, params):
            push_until_ok(w, p)
    _save_together(workers, root)
    workers[1].close()
    return workers[0], params[0]


def _register_late(late: ps.Worker, params: dict) -> Background:
    return Background(lambda: late.register(params, optimizer=ps.optim.SGD(lr=1.0)), late)


def test_a_late_worker_registering_while_a_server_is_stopped_takes_part_once_it_is_back(make_cluster, tmp_path):
    """Finding 1: a worker joins while server 0 is stopped (SIGSTOP); server 0 is declared dead and
    restarted. The activation the scheduler sent to the stopped process used to be lost, and
    register() waited for ever (the worker, live and heartbeating, held up every barrier and
    checkpoint); now it is sent again to the new process, and register() returns once it is back."""
    cluster = restartable(make_cluster, tmp_path, num_workers=2, elastic=True)
    root = tmp_path / "ckpt"
    worker, params = _rank_1_free(cluster, root)
    with worker:
        try:
            os.kill(cluster.processes()["server-0"].pid, signal.SIGSTOP)
            late, late_params = ps.init(scheduler=cluster.scheduler), {"big": torch.zeros(N)}
            registering = _register_late(late, late_params)
            wait_for(lambda: declared_dead(cluster, "server", 0), 15, "server 0 declared dead")
        finally:
            restart_server(cluster, 0)
        with late:
            registering.result(timeout=30)
            assert late.rank == 1 and torch.equal(late_params["big"], torch.full((N,), -4.0))
            push_until_ok(late, late_params)
            push_until_ok(worker, params)
            worker.pull(params).wait(timeout=10)
            assert torch.equal(params["big"], torch.full((N,), -6.0)), params["big"]


def test_a_rollback_during_a_late_workers_first_pull_is_handled_by_register(make_cluster, tmp_path):
    """Finding 7: register() ends with a pull of the current values; server 1 stops just as that
    pull goes out, and is restarted, so the job goes back to step 2. register() used to raise
    RolledBackError after the registration was done (a second register() is refused); now it takes
    the restored values itself."""
    cluster = restartable(make_cluster, tmp_path, num_workers=2, elastic=True)
    root = tmp_path / "ckpt"
    worker, params = _rank_1_free(cluster, root)
    with worker:
        push_until_ok(worker, params)  # w = -5, lost in the rollback
        late, late_params = ps.init(scheduler=cluster.scheduler), {"big": torch.zeros(N)}
        with late:
            pull = late.pull

            def pull_with_server_1_stopped(tensors):
                late.pull = pull
                os.kill(cluster.processes()["server-1"].pid, signal.SIGSTOP)
                return pull(tensors)

            late.pull = pull_with_server_1_stopped
            try:
                registering = _register_late(late, late_params)
                wait_for(lambda: declared_dead(cluster, "server", 1), 15, "server 1 declared dead")
            finally:
                restart_server(cluster, 1)
            registering.result(timeout=30)
            assert late.membership.rollback == (1, 2)
            assert torch.equal(late_params["big"], torch.full((N,), -4.0)), late_params["big"]
            push_until_ok(late, late_params)
            push_until_ok(worker, params)
            worker.pull(params).wait(timeout=10)
            assert torch.equal(params["big"], torch.full((N,), -6.0)), params["big"]
