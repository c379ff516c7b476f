"""Shared-memory lanes between workers and the servers of their host, against the socket path.

Every other test runs with lanes on (the default on one host); these check that the lanes are
really taken, that both paths give the same numbers, and what happens where a lane cannot be used.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

import psframework as ps
from psframework import protocol as P
from psframework.errors import BadRequestError
from psframework.datapath.lane import shm_available
from tests.integration import models
from tests.integration.test_core import CHUNK, assert_one_step_of_ones, assert_params_equal, pull_after_pushes
from tests.threads import run_in_threads

pytestmark = pytest.mark.skipif(not shm_available(), reason="no memfd_create or /proc/PID/fd on this system")


def _shm_files() -> set[Path]:
    return set(Path("/dev/shm").glob("*")) if Path("/dev/shm").is_dir() else set()


@pytest.mark.parametrize("shm", ["1", "0"])
def test_sync_training_is_the_same_through_lanes_and_sockets(make_cluster, worker_procs, shm):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "sync_train", 2, env={"PS_SHM": shm}, optimizer="adam", steps=4).join()
    want = models.reference("adam", 4)
    for got in results:
        assert_params_equal(got, want, rtol=1e-5, atol=1e-6)


def test_lanes_carry_every_request_and_leave_no_file(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        assert sorted(worker.lanes.lanes) == [0, 1]
        assert all(lane.fd is None for lane in worker.lanes.lanes.values()), \
            "the descriptor the servers opened a lane by is closed once they mapped it"
        before = sum(s["lane_requests"] for s in worker.server_stats())
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        start = {k: v.clone() for k, v in params.items()}
        for _ in range(3):
            worker.push_pull(grads, into=params).wait(timeout=30)
        blocks = len(worker.shard_map.blocks)
        stats = worker.server_stats()
        assert sum(s["lane_requests"] for s in stats) - before == 3 * blocks
        assert all(s["lanes"] == [0] for s in stats)
        for key in params:
            torch.testing.assert_close(params[key], start[key] - 1.5)


@contextmanager
def one_async_worker(make_cluster, device: str = "cpu", **cluster):
    """A worker of an async job with one server (on ``device``), the test model registered with
    SGD on ``device``, and gradients of ones for it."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async", chunk_bytes=CHUNK, server_device=device)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {k: v.to(device) for k, v in models.make_params(0).items()}
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        yield worker, params, {k: torch.ones_like(v) for k, v in params.items()}


def test_an_exchange_dropped_half_sent_frees_the_lane_slots_of_its_blocks(make_cluster):
    """A step that fails while its exchange is being sent (``DistributedOptimizer`` with overlap)
    drops the exchange: the lane slots it reserved for blocks it never sent are freed, so later
    requests still go through the lanes instead of the sockets; it does not count as a step; and
    dropping it again frees nothing that another exchange holds by then."""
    with one_async_worker(make_cluster) as (worker, params, grads):
        blocks = worker.shard_map.blocks
        exchange = worker.exchange(P.PushPull, list(params), params)
        worker.counted(exchange.future)  # as the optimizer's step does
        exchange.add("W", grads["W"])
        exchange.send_ready(wait=True)
        assert 0 < exchange.sent_blocks < len(blocks)
        exchange.abandon()
        exchange.future.wait(timeout=30)
        assert exchange.all_sent, "nothing more of a dropped exchange goes out"
        assert worker.steps == 0, "a dropped exchange counted as a step"
        holder = worker.exchange(P.Pull, list(params), params)  # reserves every block's slots
        exchange.abandon()
        assert all(worker.lanes.reserve(block) is None for block in blocks), "a second drop freed held slots"
        holder.send_ready(wait=True)
        holder.future.wait(timeout=30)
        before = worker.server_stats()[0]["lane_requests"]
        worker.push_pull(grads, into=params).wait(timeout=30)
        assert worker.server_stats()[0]["lane_requests"] - before == len(blocks)


def test_a_sync_step_one_worker_dropped_half_sent_completes_and_the_next_lines_up(make_cluster):
    """Two workers in sync mode; worker 0's step fails after it sent part of its gradients (say its
    loss was NaN and it skips the batch). The blocks it never sent are pushed without a gradient,
    so the step completes for both (worker 0's sent gradients count, the rest count as zero in the
    mean), and the next step is a normal one for both instead of a rejected push."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK)
    start = models.make_params(0)
    in_w = {}

    def work(rank):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {k: v.clone() for k, v in start.items()}
            worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
            grads = {k: torch.ones_like(v) for k, v in params.items()}
            if worker.rank == 0:
                exchange = worker.exchange(P.PushPull, list(params), params)
                exchange.add("W", grads["W"])
                exchange.send_ready(wait=True)
                in_w.update(sent=exchange.sent_blocks, all=len(worker.shard_map.blocks))
                exchange.abandon()
                worker.pull(params).wait(timeout=30)  # the step completed: its values
            else:
                worker.push_pull(grads, into=params).wait(timeout=30)
            after_drop = {k: v.clone() for k, v in params.items()}
            worker.push_pull(grads, into=params).wait(timeout=30)
            return after_drop, params

    results = run_in_threads(2, work)
    assert 0 < in_w["sent"] < in_w["all"] and set(models.make_params(0)) - {"W"}
    for after_drop, params in results:
        torch.testing.assert_close(after_drop["W"], start["W"] - 0.5)  # both workers' gradients
        for key in set(start) - {"W"}:
            torch.testing.assert_close(after_drop[key], start[key] - 0.25)  # worker 1's, halved
        for key in start:
            torch.testing.assert_close(params[key], after_drop[key] - 0.5)


def test_a_push_pull_that_fails_half_sent_leaves_the_lanes_free(make_cluster, monkeypatch):
    """The job went back to a checkpoint while a push_pull was being sent (here: as its second
    block goes out): the call raises, and the blocks it never sent do not keep their lane slots."""
    with one_async_worker(make_cluster) as (worker, params, grads):
        blocks = len(worker.shard_map.blocks)
        same_epoch, calls = worker.client.same_epoch, []

        def rolled_back_at_the_second_block(epoch):
            calls.append(epoch)
            if len(calls) == 2:
                raise ps.RolledBackError("the job went back while this exchange was being sent", step=0)
            same_epoch(epoch)

        monkeypatch.setattr(worker.client, "same_epoch", rolled_back_at_the_second_block)
        with pytest.raises(ps.RolledBackError):
            worker.push_pull(grads, into=params).wait(timeout=30)
        monkeypatch.setattr(worker.client, "same_epoch", same_epoch)
        worker.client.wait_all(timeout=30)
        before = worker.server_stats()[0]["lane_requests"]
        worker.push_pull(grads, into=params).wait(timeout=30)
        assert worker.server_stats()[0]["lane_requests"] - before == blocks


def test_pulls_land_in_the_tensors_given_each_time_also_after_their_storage_moved(make_cluster):
    """The worker keeps where each key's pulled values go from one exchange to the next
    (``worker/plans.py``); a tensor whose storage was swapped (``p.data = ...``) gets them there,
    and so does another tensor given for the key."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        want = {k: v.clone() for k, v in params.items()}
        worker.pull(params).wait(timeout=30)
        moved, replaced = list(params)[:2]
        old_storage = params[moved].data
        params[moved].data = torch.zeros_like(old_storage)
        params[replaced] = torch.zeros_like(params[replaced])
        old_storage.fill_(7.0)
        worker.pull(params).wait(timeout=30)
        for key in params:
            torch.testing.assert_close(params[key], want[key])
        assert torch.all(old_storage == 7.0), "the old storage was written"


def test_no_lane_file_outlives_a_killed_job(make_cluster, worker_procs):
    """Workers killed at any moment, servers too: lanes never had a name, so /dev/shm is as before."""
    before = _shm_files()
    cluster = make_cluster(num_servers=2, num_workers=3, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "die_after", 3, steps=3, victim=2).join(expect_ok=False)
    assert results[0] is not None and "worker 2" in results[0]["error"]
    cluster.stop()
    assert _shm_files() == before


def test_back_to_back_pushes_share_lanes_and_sockets_and_none_is_lost(make_cluster):
    """Pushes issued without waiting find their block's lane slots taken and go over the socket;
    each is applied exactly once, whichever way it went."""
    workers, pushes = 2, 15
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="async", chunk_bytes=CHUNK)

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {k: torch.zeros_like(v) for k, v in models.make_params(0).items()}  # sums stay exact
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            futures = [worker.push({k: torch.full_like(v, float(worker.rank * 100 + k_ + 1))
                                    for k, v in params.items()}) for k_ in range(pushes)]
            return params, pull_after_pushes(worker, futures, params), len(worker.shard_map.blocks)

    results = run_in_threads(workers, work)
    expected = -sum(r * 100 + k + 1 for r in range(workers) for k in range(pushes))
    for params, stats, blocks in results:
        for key, value in params.items():
            assert torch.equal(value, torch.full_like(value, float(expected))), key
        lane_requests = sum(s["lane_requests"] for s in stats)
        total = sum(s["pushes"] for s in stats)
        assert total == workers * pushes * blocks
        assert 0 < lane_requests < total, "both the lanes and the sockets should have carried pushes"


def test_a_lane_with_the_wrong_token_is_refused_and_the_socket_still_works(make_cluster, monkeypatch):
    monkeypatch.setenv("PS_SHM", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        assert worker.lanes.lanes == {}
        from psframework.datapath.lane import Lane, lane_name

        lane = Lane.create(lane_name(worker.rank, 0), [(b.block_id, b.nbytes) for b in worker.shard_map.blocks])
        try:
            # we send another token than the file holds (changing the file after sending raced the server)
            monkeypatch.setattr(Lane, "token", property(lambda self: bytes(16)))
            future = worker.lanes.request_attach(0, lane).future
            with pytest.raises(BadRequestError, match="another token"):
                future.wait(timeout=10)
        finally:
            lane.close()
        assert_one_step_of_ones(worker, params, lr=1.0)
        assert worker.server_stats()[0]["lane_requests"] == 0


def test_a_lane_request_from_a_worker_without_a_lane_is_refused(make_cluster, monkeypatch):
    monkeypatch.setenv("PS_SHM", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register(models.make_params(0), optimizer=ps.optim.SGD(lr=1.0))
        request = P.Pull(req=1, block=0, rank=0, shm=True)
        from tests.integration.test_core import _raw_client

        sock = _raw_client(worker.client.servers[0].address, worker)
        try:
            sock.send(P.encode(request))
            reply = P.decode(sock.recv())
        finally:
            sock.close()
        assert isinstance(reply, P.Error) and "has none attached" in reply.message
        worker.pull(models.make_params(1)).wait(timeout=10)  # the server still serves


@pytest.mark.gpu
@pytest.mark.parametrize("shm", ["1", "0"])
def test_gpu_workers_and_gpu_shards_through_lanes_and_sockets(make_cluster, worker_procs, shm):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
    results = worker_procs(cluster, "sync_train", 2, env={"PS_SHM": shm}, optimizer="sgd", steps=4,
                           device="cuda").join()
    want = models.reference("sgd", 4)
    for got in results:
        assert_params_equal(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sync_answers_leave_the_values_in_the_servers_shared_memory(make_cluster, mode):
    """A sync server in host memory offers its values with its answer to a lane; then none of its
    answers writes a pull slot. Async answers go through the pull slots (the server writes between
    its updates there), so no shared values are offered."""
    workers, steps = 2, 3
    cluster = make_cluster(num_servers=2, num_workers=workers, mode=mode, chunk_bytes=CHUNK)

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {k: torch.zeros_like(v) for k, v in models.make_params(0).items()}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            offered = sorted(worker.lanes.values)
            for _ in range(steps):
                worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)
            worker.barrier(timeout=30)
            return params, offered, worker.server_stats(), len(worker.shard_map.blocks)

    for params, offered, stats, blocks in run_in_threads(workers, work):
        shared = sum(s["shared_answers"] for s in stats)
        if mode == "sync":
            assert offered == [0, 1]
            assert shared == workers * steps * blocks
            for key, value in params.items():
                assert torch.equal(value, torch.full_like(value, -float(steps))), key
        else:
            assert offered == [] and shared == 0


def _mapped_lanes(pid: int) -> list[str]:
    """The lane files a process has mapped (their names, as /proc shows memfds)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return sorted({line.split()[-2] for line in maps.splitlines() if "memfd:psf-" in line and "-w" in line})


def test_the_lanes_of_a_dead_worker_are_unmapped_by_the_servers(make_cluster, worker_procs, tmp_path):
    """An elastic job goes on without a worker that died; its server gives back that worker's lanes
    (the others' stay mapped while they live)."""
    cluster = make_cluster(num_servers=1, num_workers=3, mode="sync", elastic=True, chunk_bytes=CHUNK)
    server = cluster.processes()["server-0"]
    flags = tmp_path / "flags"
    flags.mkdir()
    procs = worker_procs(cluster, "elastic_train", 3, flag_dir=str(flags), victim=2, die_at=2, first=4, second=1)
    deadline = time.monotonic() + 30
    while not all((flags / f"done-{rank}").exists() for rank in (0, 1)) and time.monotonic() < deadline:
        assert procs.procs[0].poll() is None and procs.procs[1].poll() is None, procs.output(0) + procs.output(1)
        time.sleep(0.05)
    assert procs.procs[2].wait(timeout=5) == 17
    while any("-w2-" in name for name in _mapped_lanes(server.pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    lanes = _mapped_lanes(server.pid)
    assert [name for name in lanes if "-w2-" in name] == [], lanes
    assert sorted(name.split("-")[2] for name in lanes) == ["w0", "w1"], lanes
    (flags / "joined").touch()  # the survivors go on and finish
    for rank in (0, 1):
        procs.join_one(rank, timeout=30)
    procs.join(expect_ok=False)


TWO_WORKERS_SIZES = {"w": ps.optim.TILE_BYTES // 4 * 2 + 13, "b": 7}  # a block of three tiles, packed with b
TWO_WORKERS_SGD = dict(lr=0.1, momentum=0.9, weight_decay=0.01)


def two_workers_start() -> dict[str, torch.Tensor]:
    return {k: torch.randn(n, generator=torch.Generator().manual_seed(5)) for k, n in TWO_WORKERS_SIZES.items()}


def two_workers_grads(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    return {k: torch.randn(n, generator=g) for k, n in TWO_WORKERS_SIZES.items()}


def fused_sgd_on_the_sum(steps: int) -> dict[str, torch.Tensor]:
    """torch's fused SGD stepping the sum of both workers' gradients, from ``two_workers_start``."""
    want = two_workers_start()
    reference = torch.optim.SGD(list(want.values()), **TWO_WORKERS_SGD, fused=True)
    reference.grad_scale = torch.tensor(2.0)  # the mean of two workers, as the server's fused kernel takes it
    for step in range(steps):
        for k, p in want.items():
            p.grad = two_workers_grads(0, step)[k] + two_workers_grads(1, step)[k]
        reference.step()
    return want


def test_two_workers_sync_sgd_through_lanes_equals_torchs_step_on_the_whole_sum(make_cluster):
    """The server sums the two workers' lane slots a tile at a time as it steps them; the values
    have the same bits as torch's fused SGD stepping the whole sum, over a block of three tiles."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="sync")

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = two_workers_start()
            worker.register(params, optimizer=ps.optim.SGD(**TWO_WORKERS_SGD))
            for step in range(3):
                worker.push_pull(two_workers_grads(worker.rank, step), into=params).wait()
            return params, worker.server_stats()

    results = run_in_threads(2, work)
    want = fused_sgd_on_the_sum(3)
    for params, stats in results:
        assert sum(s["lane_requests"] for s in stats) > 0
        for k in TWO_WORKERS_SIZES:
            assert torch.equal(params[k], want[k]), k
