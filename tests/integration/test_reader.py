"""``ps.Reader``: read a job's values while it trains, without taking part (issue 17)."""

from __future__ import annotations


import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import psframework as ps
from psframework import protocol as P
from psframework.errors import PSTimeoutError
from tests.conftest import WorkerProcs

SHAPES = {"a": (5, 3), "b": (40,), "c": (7,)}


def _tensors(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def _steps(worker, params: dict[str, torch.Tensor], n: int) -> None:
    """``n`` sync steps of SGD(lr=1) with gradient -1 everywhere: every value goes up by 1 a step."""
    for _ in range(n):
        worker.push_pull({k: -torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)


def test_a_snapshot_holds_the_values_and_the_step_of_a_sync_job(make_cluster):
    """Two servers, tensors over several blocks (one split between servers): after three steps a
    snapshot holds exactly the worker's values and says step 3; the reader does not count in the
    job's steps (one worker steps on alone) and its snapshot leaves the values untouched."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=64)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = _tensors()
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            assert len({block.server for block in reader.shard_map.blocks}) == 2
            got = _tensors(-1.0)
            assert reader.snapshot(got) == 0 and torch.equal(got["b"], torch.zeros(40))
            _steps(worker, params, 3)
            version = reader.snapshot(got)
            assert version == 3 and version.consistent and version.tensors == {"a": 3, "b": 3, "c": 3}
            for name in SHAPES:
                assert torch.equal(got[name], params[name]) and torch.equal(got[name], torch.full(SHAPES[name], 3.0))
            _steps(worker, params, 1)  # the reader's reads are no pushes: the step is the worker's alone
            assert reader.snapshot({"c": got["c"]}) == 4 and torch.equal(got["c"], torch.full((7,), 4.0))
        stats = worker.server_stats()
        assert sum(s["reads"] for s in stats) > 0 and sum(s["pushes"] for s in stats) == 4 * len(reader.shard_map.blocks)


def test_snapshots_taken_while_two_workers_train_are_never_torn_nor_mixed(make_cluster, tmp_path):
    """Two worker processes train continuously in sync mode, every value going up by one a step
    (so a value is its step); every snapshot taken meanwhile holds one step in all of its elements,
    over three blocks on two servers, and that step is the version it names."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=4096)
    procs = WorkerProcs(cluster, "count_up", 2, tmp_path, steps=100000, numel=3000)
    try:
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            assert len(reader.shard_map.blocks) >= 3
            dest = {"w": torch.empty(3000), "v": torch.empty(1000)}
            seen = []
            while len(seen) < 30 or seen[-1] - seen[0] < 5:
                version = reader.snapshot(dest)
                for name, tensor in dest.items():
                    assert torch.equal(tensor, torch.full_like(tensor, float(version))), (name, version, tensor.unique())
                seen.append(int(version))
            assert seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        procs.stop()


def test_a_read_given_up_and_sent_again_waits_on_the_server_once(make_cluster):
    """A reader that gave up on a read of a version not reached yet, and sends it again, leaves
    one read waiting on the server, not one per attempt; it is answered once the version is there."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = _tensors()
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            block = reader.shard_map.blocks[0]
            read = (block.server, P.Read(req=0, block=block.block_id, segs=[], at_least=2), [], lambda frames: None,
                    f"block {block.block_id}")
            for _ in range(3):
                with pytest.raises(PSTimeoutError):
                    reader.links.exchange([read], time.monotonic() + 0.3)
            assert [s["waiting_reads"] for s in worker.server_stats()] == [1]
            _steps(worker, params, 2)
            assert [s["waiting_reads"] for s in worker.server_stats()] == [0]
            assert reader.snapshot(_tensors()) == 2  # the late answer was dropped; the reader reads on


def test_an_async_snapshot_counts_updates_per_tensor_and_says_it_is_not_one_step(make_cluster):
    """Async: each push is an update of its blocks only; the snapshot's version sums the updates of
    the blocks read, each tensor's count is its own, and it is not called consistent."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = _tensors()
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        worker.push({"a": -torch.ones(5, 3)}).wait(timeout=30)
        worker.push({"a": -torch.ones(5, 3), "c": -torch.ones(7)}).wait(timeout=30)
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            got = _tensors(-1.0)
            version = reader.snapshot(got)
            assert not version.consistent and version.tensors["a"] == 2 and version.tensors["c"] >= 1
            assert version.tensors["b"] <= 2 and version == sum(reader.versions().values())
            assert torch.equal(got["a"], torch.full((5, 3), 2.0)) and torch.equal(got["c"], torch.ones(7))
            assert torch.equal(got["b"], torch.zeros(40))


def test_a_reader_looks_up_rows_without_creating_any(make_cluster):
    """Rows the worker trained come back as they are, in the order and shape asked (repeats too);
    ids the table never saw get their initial rows and are not created on the servers."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        table = ps.nn.Embedding(None, 3, init=ps.nn.RowInit("constant", 0.5))
        worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"users": table},
                        sparse_optimizer=ps.optim.SGD(lr=1.0))
        trained = torch.arange(0, 40, 3)
        worker.pull_rows("users", trained).wait(timeout=30)
        worker.push_rows("users", trained, -trained.float()[:, None].expand(-1, 3).contiguous()).wait(timeout=30)
        rows_before = sum(s["tables"]["users"]["rows"] for s in worker.server_stats())
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            ids = torch.tensor([[3, 1000], [39, 3]])
            rows = reader.lookup("users", ids)
            assert rows.shape == (2, 2, 3)
            assert torch.equal(rows[0, 0], torch.full((3,), 3.5)) and torch.equal(rows[1, 1], rows[0, 0])
            assert torch.equal(rows[1, 0], torch.full((3,), 39.5)) and torch.equal(rows[0, 1], torch.full((3,), 0.5))
            with pytest.raises(ps.ConfigError, match="unknown table 'items'"):
                reader.lookup("items", ids)
        assert sum(s["tables"]["users"]["rows"] for s in worker.server_stats()) == rows_before == trained.numel()


def test_watch_refreshes_a_module_in_place_when_the_job_steps(make_cluster):
    """watch() yields the current version at once, with the module refreshed, and the next one
    only after a step; parameters that are not registered are left alone."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    trained, served = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"weight": trained.weight.detach().clone()}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        bias = served.bias.detach().clone()
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            versions = reader.watch(served, every=0.05)
            assert next(versions) == 0 and torch.equal(served.weight.detach(), params["weight"])
            _steps(worker, params, 2)
            assert next(versions) == 2 and torch.equal(served.weight.detach(), params["weight"])
            assert torch.equal(served.bias.detach(), bias) and served.weight.requires_grad
            with pytest.raises(ps.ConfigError, match="none of the model's parameters"):
                next(reader.watch(torch.nn.Sequential(torch.nn.Linear(4, 2))))


def test_bad_snapshots_are_refused_with_the_tensor_named(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register(_tensors(), optimizer=ps.optim.SGD(lr=1.0))
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            with pytest.raises(ps.ConfigError, match=r"'zz' is not registered"):
                reader.snapshot({"zz": torch.zeros(1)})
            with pytest.raises(ps.ConfigError, match=r"'a' is registered as float32 \(5, 3\), got a tensor of float64"):
                reader.snapshot({"a": torch.zeros(5, 3, dtype=torch.float64)})
            with pytest.raises(ps.ConfigError, match="must be contiguous"):
                reader.snapshot({"a": torch.zeros(3, 5).t()})


def test_a_reader_waits_for_the_registration_and_learns_when_the_job_is_over(make_cluster):
    """A reader that comes before the tensors are registered is welcomed once they are; one that
    waits when the job ends is told so; reads of a job that is over fail within their timeout,
    naming the server, instead of hanging."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ThreadPoolExecutor(2) as pool:
        early = pool.submit(ps.Reader, scheduler=cluster.scheduler, timeout=20)
        with ps.init(scheduler=cluster.scheduler) as worker:
            time.sleep(0.5)
            assert not early.done()
            worker.register(_tensors(), optimizer=ps.optim.SGD(lr=1.0))
            reader = early.result(timeout=20)
            assert reader.snapshot(_tensors()) == 0
    assert cluster.wait(timeout=20) == {"scheduler": 0, "server-0": 0}
    reader.timeout = 2.0
    started = time.monotonic()
    with pytest.raises(ps.PeerLostError, match="the job is over or lost"):
        reader.snapshot(_tensors())
    assert time.monotonic() - started < 10
    reader.close()

    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ps.Reader, scheduler=cluster.scheduler, timeout=20)
        with ps.init(scheduler=cluster.scheduler):
            time.sleep(0.5)
        with pytest.raises(ps.PeerLostError, match="the job is over: every worker finished"):
            waiting.result(timeout=20)


def test_a_reader_follows_a_restarted_server(make_cluster, tmp_path):
    """A server is killed and restarted (the job goes back to its checkpoint): the reader's next
    snapshot finds the server at its new address and reads the values the job went back to."""
    from tests.integration.test_chaos_bugs import one_worker, push_until_ok, restart_server, restartable, wait_for

    cluster = restartable(make_cluster, tmp_path)
    worker, params = one_worker(cluster)
    with worker, ps.Reader(scheduler=cluster.scheduler, timeout=3) as reader:
        push_until_ok(worker, params, 3)
        worker.save_checkpoint(tmp_path / "ckpt")
        push_until_ok(worker, params, 2)
        got = {"big": torch.empty_like(params["big"])}
        reader.snapshot(got)
        assert torch.equal(got["big"], torch.full_like(got["big"], -5.0))
        first = reader.reader
        restart_server(cluster, 1)
        wait_for(lambda: worker.membership.rollback[0] == 1, 30, "the rollback")
        reader.snapshot(got)
        assert torch.equal(got["big"], torch.full_like(got["big"], -3.0)) and reader.reader != first


@pytest.mark.gpu
def test_a_reader_reads_a_gpu_server_into_gpu_and_host_tensors(make_cluster, tmp_path):
    """Shards on the GPU, two workers training: snapshots land in CUDA and host tensors alike,
    each one step in every element."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="sync", server_device="cuda", chunk_bytes=4096)
    procs = WorkerProcs(cluster, "count_up", 2, tmp_path, steps=100000, numel=3000)
    try:
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            dest = {"w": torch.empty(3000, device="cuda"), "v": torch.empty(1000)}
            seen = []
            while len(seen) < 20 or seen[-1] - seen[0] < 5:
                version = reader.snapshot(dest)
                for name, tensor in dest.items():
                    assert torch.equal(tensor, torch.full_like(tensor, float(version))), (name, version)
                seen.append(int(version))
    finally:
        procs.stop()


def test_a_reader_looks_up_rows_after_a_server_moved(make_cluster, tmp_path):
    """lookup() after a restarted server: the retry speaks with the reader's new id (the first
    version sent the old one and was refused)."""
    from tests.integration.test_chaos_bugs import restart_server, restartable, wait_for

    cluster = restartable(make_cluster, tmp_path)
    with ps.init(scheduler=cluster.scheduler) as worker:
        table = ps.nn.Embedding(64, 2, init=ps.nn.RowInit("constant", 0.0))
        worker.register({"w": torch.zeros(4)}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": table},
                        sparse_optimizer=ps.optim.SGD(lr=1.0))
        reader = ps.Reader(scheduler=cluster.scheduler, timeout=3)
        ids = torch.arange(64)
        worker.pull_rows("t", ids).wait(timeout=30)
        worker.push_rows("t", ids, -torch.ones(64, 2)).wait(timeout=30)
        worker.save_checkpoint(tmp_path / "ckpt")
        assert torch.equal(reader.lookup("t", ids), torch.ones(64, 2))
        restart_server(cluster, 1)
        wait_for(lambda: worker.membership.rollback[0] == 1, 30, "the rollback")
        try:
            assert torch.equal(reader.lookup("t", ids), torch.ones(64, 2))
        finally:
            reader.close()
