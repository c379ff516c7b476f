"""Embedding tables on the servers: equal to torch, exact in async, admission and eviction as
specified, checkpoints with tables, and bad input refused."""

from __future__ import annotations

import pytest
import torch

import psframework as ps
from tests.integration import models

STEPS = 20


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("rule,mode,weighted", [  # every rule x (sum, mean, weighted sum: torch's only weighted mode)
    (rule, mode, weighted) for rule in ("sparse_adam", "sgd", "adagrad")
    for mode, weighted in (("sum", False), ("mean", False), ("sum", True))
])
def test_sync_tables_equal_single_process_torch(make_cluster, worker_procs, workers, rule, mode, weighted):
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="sync")
    results = worker_procs(cluster, "emb_train", workers, rule=rule, mode=mode, weighted=weighted,
                           steps=STEPS).join(timeout=120)
    want = models.emb_reference(rule, mode, weighted, STEPS)
    assert not torch.allclose(want["weight"], models.emb_weight()), "the reference must have moved the rows"
    for got in results:
        assert got["steps"] == STEPS
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_ssp_tables_with_one_worker_equal_single_process_torch(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="ssp")
    got = worker_procs(cluster, "emb_train", 1, rule="sparse_adam", mode="mean", weighted=False,
                       steps=8).join(timeout=120)[0]
    want = models.emb_reference("sparse_adam", "mean", False, 8)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def _train_in_process(cluster, bag, steps: int, rule: str = "sparse_adam", prefetch: bool = False) -> dict:
    """models.EmbNet over ``bag`` trained in this process; what emb_reference returns."""
    model = models.EmbNet(bag)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=models.SPARSE_RULES[rule]) as opt:
        for step in range(steps):
            ids, _, y = models.emb_batch(step)
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(ids), y)
            if prefetch and step + 1 < steps:
                opt.prefetch({model.bag: models.emb_batch(step + 1)[0]})
            loss.backward()
            opt.step()
        weight = opt.worker.pull_rows("bag", torch.arange(models.EMB_ROWS), train=False).wait()
        opt.worker.close()
    return {"weight": weight, "head.weight": model.head.weight.detach().clone(),
            "head.bias": model.head.bias.detach().clone()}


def test_prefetched_rows_train_as_rows_looked_up_in_the_forward(make_cluster):
    """opt.prefetch() of the next batch's ids, answered once the step is applied: the same
    training as one process."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync")
    got = _train_in_process(cluster, ps.nn.EmbeddingBag.from_pretrained(models.emb_weight(), mode="sum"), 6,
                            prefetch=True)
    want = models.emb_reference("sparse_adam", "sum", False, 6)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_a_tables_own_optimizer_overrides_the_sparse_optimizer(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync")
    bag = ps.nn.EmbeddingBag.from_pretrained(models.emb_weight(), mode="sum", optimizer=models.SPARSE_RULES["adagrad"])
    got = _train_in_process(cluster, bag, 6, rule="sgd")  # the table's Adagrad wins over sparse_optimizer=SGD
    want = models.emb_reference("adagrad", "sum", False, 6)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_a_model_in_eval_mode_creates_no_row(make_cluster):
    """After training, model.eval(): a forward over ids never seen reads their initial rows, and
    the servers hold no more rows than before."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync")
    model = HashedNet()
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=ps.optim.SGD(lr=0.1)) as opt:
        ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
        opt.zero_grad()
        model(ids).pow(2).mean().backward()
        opt.step()
        rows_before = sum(s["tables"]["users"]["rows"] for s in opt.worker.server_stats())
        model.eval()
        unseen = torch.tensor([[10**15, 7 * 10**15, 3]])
        with torch.no_grad():
            out = model(unseen)
        initial = ps.nn.EmbeddingBag(None, 4, mode="sum").table_spec("users")
        from psframework.rowhash import initial_rows
        rows = opt.worker.pull_rows("users", torch.tensor([10**15, 7 * 10**15, 3]), train=False).wait()
        assert torch.equal(rows[:2], initial_rows(initial, torch.tensor([10**15, 7 * 10**15])))
        torch.testing.assert_close(out, model.head(rows.sum(0, keepdim=True)))
        assert sum(s["tables"]["users"]["rows"] for s in opt.worker.server_stats()) == rows_before == 6
        opt.worker.close()


# ---------------------------------------------------------------------------------------- placement


class HashedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.users = ps.nn.EmbeddingBag(None, 4, mode="sum")
        self.head = torch.nn.Linear(4, 1)

    def forward(self, ids):
        return self.head(self.users(ids))


def _train_hashed(cluster, steps: int = 6) -> dict:
    model = HashedNet()
    g = torch.Generator().manual_seed(11)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                 sparse_optimizer=ps.optim.RowWiseAdagrad(lr=0.3)) as opt:
        seen = []
        for _ in range(steps):
            ids = torch.randint(-2**62, 2**62, (5, 3), generator=g)
            ids[0, 0] = seen[-1][1, 1] if seen else ids[0, 0]  # a row used again
            seen.append(ids)
            opt.zero_grad()
            model(ids).pow(2).mean().backward()
            opt.step()
        every = torch.cat([s.reshape(-1) for s in seen])
        rows = opt.worker.pull_rows("users", every, train=False).wait()
        opt.worker.close()
    return {"rows": rows, "head": model.head.weight.detach().clone()}


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_max_pooled_tables_equal_torchs_max_bag(make_cluster, worker_procs, workers, rule):
    """torch refuses sparse gradients for mode="max"; its dense gradient with SGD or Adagrad (which
    leave a row whose gradient is zero as it is) is the reference."""
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="sync")
    results = worker_procs(cluster, "emb_train", workers, rule=rule, mode="max", weighted=False,
                           steps=STEPS).join(timeout=120)
    want = models.emb_reference(rule, "max", False, STEPS)
    assert not torch.allclose(want["weight"], models.emb_weight())
    for got in results:
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")


def test_hashed_tables_train_alike_on_1_and_3_servers(make_cluster):
    one = _train_hashed(make_cluster(num_servers=1, num_workers=1))
    three = _train_hashed(make_cluster(num_servers=3, num_workers=1))
    assert torch.equal(one["rows"], three["rows"]) and torch.equal(one["head"], three["head"])


# ---------------------------------------------------------------------------------------- lanes


def test_rows_through_the_lanes_train_as_rows_over_the_socket(make_cluster, worker_procs):
    results = {}
    for shm in ("1", "0"):
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync")
        results[shm] = worker_procs(cluster, "emb_train", 2, env={"PS_SHM": shm}, rule="sparse_adam", mode="sum",
                                    weighted=True, steps=6).join(timeout=120)
    assert all(got["lane_requests"] >= 2 * 2 * 6 for got in results["1"]), "pulls and pushes of rows take the lanes"
    assert all(got["lane_requests"] == 0 for got in results["0"])
    for through_lane, over_socket in zip(results["1"], results["0"]):
        for key in ("weight", "head.weight", "head.bias"):
            assert torch.equal(through_lane[key], over_socket[key]), key


def _lane_requests(worker) -> int:
    return sum(s["lane_requests"] for s in worker.server_stats())


def _pull_push_round(worker, ids: torch.Tensor, grad: float) -> torch.Tensor:
    rows = worker.pull_rows("t", ids).wait(timeout=30)
    worker.push_rows("t", ids, torch.full((ids.numel(), 3), grad)).wait(timeout=30)
    return rows


@pytest.mark.parametrize("row_lane_bytes,through_lane", [(None, True), ("256", False), ("0", False)])
def test_row_requests_take_the_lanes_row_areas_where_they_fit(make_cluster, monkeypatch, row_lane_bytes, through_lane):
    """Every pull and push of rows to a server of this host goes through its lane's row areas,
    unless it does not fit there (the rest: over the socket, with the same values)."""
    if row_lane_bytes is not None:
        monkeypatch.setenv("PS_ROW_LANE_BYTES", row_lane_bytes)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async")
    with ps.init(scheduler=cluster.scheduler) as worker:
        table = ps.nn.Embedding(50, 3, init=ps.nn.RowInit("constant", 0.0))
        worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": table}, sparse_optimizer=ps.optim.SGD(lr=1.0))
        # a server holding only rows gets a lane too, unless rows may not take the lanes
        assert sorted(worker.lanes.lanes) == ([] if row_lane_bytes == "0" else [0, 1])
        ids = torch.arange(50).repeat(2)  # 50 distinct ids: 400 bytes of ids on the two servers together
        before = _lane_requests(worker)
        for k in range(3):
            rows = _pull_push_round(worker, ids, 1.0)
            assert torch.equal(rows, torch.full((100, 3), -2.0 * k))  # each id twice: its gradient summed
        assert _lane_requests(worker) - before == (3 * 2 * 2 if through_lane else 0)
        small = torch.tensor([1, 2])  # 16 bytes of ids and 24 of rows fit in 256 bytes
        before = _lane_requests(worker)
        _pull_push_round(worker, small, 0.5)
        assert _lane_requests(worker) - before == (0 if row_lane_bytes == "0" else 2 * len(set(
            int(s) for s in worker.rows._servers_of(small))))
        assert torch.equal(worker.pull_rows("t", small, train=False).wait(timeout=30), torch.full((2, 3), -6.5))


def test_a_prefetch_waiting_on_the_server_leaves_the_push_its_lane(make_cluster):
    """A pull that waits for the next push (a prefetch) holds the pull area; the push still takes
    the lane, and the prefetch then answers with the pushed rows."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync")
    with ps.init(scheduler=cluster.scheduler) as worker:
        table = ps.nn.Embedding(None, 3, init=ps.nn.RowInit("constant", 0.0))
        worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": table}, sparse_optimizer=ps.optim.SGD(lr=1.0))
        ids = torch.tensor([5, 10**12, 7])
        worker.pull_rows("t", ids).wait(timeout=30)
        before = _lane_requests(worker)
        prefetch = worker.rows.pull({"t": ids}, after=1, single=True)
        worker.push_rows("t", ids, torch.ones(3, 3)).wait(timeout=30)
        assert torch.equal(prefetch.wait(timeout=30), -torch.ones(3, 3))
        assert _lane_requests(worker) - before == 2


def test_a_row_request_beyond_the_lanes_row_area_is_refused_and_the_server_serves_on(make_cluster):
    from psframework import protocol as P
    from psframework.datapath.lane import ROW_PULLS, ROW_PUSHES
    from psframework.errors import BadRequestError
    from psframework.worker.requests import Future, Request

    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with ps.init(scheduler=cluster.scheduler) as worker:
        table = ps.nn.Embedding(None, 3, init=ps.nn.RowInit("constant", 0.0))
        worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": table}, sparse_optimizer=ps.optim.SGD(lr=1.0))
        assert worker.lanes.reserve_rows(0, ROW_PUSHES) is not None
        request = Request(Future(worker.client), 0)
        request.on_answer = lambda request, reply, ok: worker.lanes.release_rows(0, ROW_PUSHES)
        worker.rows._send(request, worker.client.rollback, P.PushRows, {"tables": [0], "counts": [10**7]}, shm=True)
        with pytest.raises(BadRequestError, match="row area"):
            request.future.wait(timeout=10)
        assert worker.lanes.reserve_rows(0, ROW_PULLS) is not None  # ids that fit, answer rows that would not
        request = Request(Future(worker.client), 0)
        request.on_answer = lambda request, reply, ok: worker.lanes.release_rows(0, ROW_PULLS)
        count = worker.lanes.row_bytes // (3 * 4) + 1
        worker.rows._send(request, worker.client.rollback, P.PullRows, {"tables": [0], "counts": [count]}, shm=True)
        with pytest.raises(BadRequestError, match="row area"):
            request.future.wait(timeout=10)
        rows = _pull_push_round(worker, torch.tensor([3, 4]), 1.0)
        assert torch.equal(rows, torch.zeros(2, 3))
        assert torch.equal(worker.pull_rows("t", torch.tensor([3, 4]), train=False).wait(timeout=30), -torch.ones(2, 3))


# ---------------------------------------------------------------------------------------- async


def test_async_applies_every_row_push_exactly(make_cluster):
    from tests.threads import run_in_threads

    workers, pushes = 3, 12
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="async")

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            table = ps.nn.Embedding(50, 3, init=ps.nn.RowInit("constant", 0.0))
            worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": table},
                            sparse_optimizer=ps.optim.SGD(lr=1.0))
            futures = []
            for k in range(pushes):
                ids = torch.tensor([k % 5, 7, 7, 40 + worker.rank])  # 7 twice: summed before it is sent
                futures.append(worker.push_rows("t", ids, torch.full((4, 3), float(worker.rank + 1))))
            for f in futures:
                f.wait(timeout=30)
            worker.barrier()
            rows = worker.pull_rows("t", torch.arange(50), train=False).wait()
            worker.barrier()
            return rows

    expected = torch.zeros(50, 3)
    for rank in range(workers):
        for k in range(pushes):
            expected[k % 5] -= rank + 1
            expected[7] -= 2 * (rank + 1)
            expected[40 + rank] -= rank + 1
    for rows in run_in_threads(workers, work, timeout=60):
        assert torch.equal(rows, expected)


# ---------------------------------------------------------------------------------------- admission, eviction


def _one_table(cluster, **table):
    worker = ps.init(scheduler=cluster.scheduler)
    module = ps.nn.Embedding(None, 2, init=ps.nn.RowInit("constant", 1.0), **table)
    worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"t": module}, sparse_optimizer=ps.optim.SGD(lr=1.0))
    return worker


def _stats(worker) -> dict:
    return worker.server_stats()[0]["tables"]["t"]


def _touch(worker, ids: list[int]) -> torch.Tensor:
    """A training step on these ids: pull (creates or counts them), push gradients of ones."""
    ids = torch.tensor(ids)
    rows = worker.pull_rows("t", ids).wait()
    worker.push_rows("t", ids, torch.ones(len(ids), 2)).wait()
    return rows


def test_a_row_is_admitted_on_its_kth_occurrence(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster, admit_after=3) as worker:
        for _ in range(2):
            assert torch.equal(_touch(worker, [5]), torch.ones(1, 2))  # the initial value; gradient dropped
        assert _stats(worker)["rows"] == 0 and _stats(worker)["admissions"] == 0
        assert torch.equal(_touch(worker, [5]), torch.ones(1, 2))  # the 3rd occurrence creates it, then updated
        assert _stats(worker)["rows"] == 1 and _stats(worker)["admissions"] == 1
        assert torch.equal(worker.pull_rows("t", torch.tensor([5]), train=False).wait(), torch.zeros(1, 2))


def test_a_full_table_evicts_the_least_recently_used_row(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster, capacity=3) as worker:
        for ids in ([1], [2], [3], [1]):  # 2 is now the least recently used
            _touch(worker, ids)
        _touch(worker, [4])
        stats = _stats(worker)
        assert stats["rows"] == 3 and stats["evictions"] == 1
        rows = worker.pull_rows("t", torch.tensor([1, 2, 3, 4]), train=False).wait()
        assert rows[:, 0].tolist() == [-1.0, 1.0, 0.0, 0.0]  # 2 starts afresh: its initial value


def test_at_capacity_a_batch_never_evicts_its_own_rows(make_cluster):
    """Full at capacity 3 with rows 1, 2, 3 (1 the least recently used): a batch of 1 and a new 4
    evicts 2, the least recently used row not in the batch, and row 1 keeps its value."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster, capacity=3) as worker:
        for ids in ([1], [2], [3]):
            _touch(worker, ids)
        rows = _touch(worker, [1, 4])
        assert rows[:, 0].tolist() == [0.0, 1.0]  # 1 stepped once from 1.0; 4 new
        stats = _stats(worker)
        assert stats["rows"] == 3 and stats["evictions"] == 1
        rows = worker.pull_rows("t", torch.tensor([1, 2, 3, 4]), train=False).wait()
        assert rows[:, 0].tolist() == [-1.0, 1.0, 0.0, 0.0]


def test_a_batch_larger_than_the_capacity_keeps_what_fits_and_the_server_lives(make_cluster):
    """5 new ids at capacity 3: 3 rows are created and trained, the other 2 read as their initial
    value (as if evicted at once; counted at the lookup and at the push), and the server goes on
    serving."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster, capacity=3) as worker:
        _touch(worker, [1, 2, 3, 4, 5])
        stats = _stats(worker)
        assert stats["rows"] == 3 and stats["evictions"] == 0 and stats["over_capacity"] == 4
        rows = worker.pull_rows("t", torch.tensor([1, 2, 3, 4, 5]), train=False).wait()
        assert sorted(rows[:, 0].tolist()) == [0.0, 0.0, 0.0, 1.0, 1.0]
        _touch(worker, [6])
        assert _stats(worker)["rows"] == 3


def test_capacity_is_the_tables_across_its_servers(make_cluster):
    """capacity=R holds about R rows of the table in all, not R per server: each of 3 servers
    keeps its share (1366 of the 4096 buckets: 11 of 30) and evicts its own least recently used
    rows."""
    cluster = make_cluster(num_servers=3, num_workers=1, mode="async")
    with _one_table(cluster, capacity=30) as worker:
        for start in range(0, 120, 20):
            _touch(worker, list(range(start, start + 20)))
        tables = [stats["tables"]["t"] for stats in worker.server_stats()]
        assert all(t["rows"] <= 11 for t in tables), tables
        assert 25 <= sum(t["rows"] for t in tables) <= 31, tables
        assert all(t["rows"] + t["evictions"] == t["admissions"] for t in tables), tables
        assert sum(t["admissions"] + t["over_capacity"] for t in tables) >= 120, tables
        newest = worker.pull_rows("t", torch.arange(100, 120), train=False).wait()
        assert torch.equal(newest, torch.zeros(20, 2)), "the last batch's rows are kept (stepped once from 1)"


def test_rows_untouched_for_ttl_steps_are_evicted(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster, ttl_steps=2) as worker:
        _touch(worker, [1])
        _touch(worker, [2])
        _touch(worker, [2])
        assert _stats(worker)["rows"] == 2
        _touch(worker, [2])  # step 4: row 1 was last touched at step 1
        assert _stats(worker)["rows"] == 1 and _stats(worker)["evictions"] == 1
        assert worker.pull_rows("t", torch.tensor([1]), train=False).wait().tolist() == [[1.0, 1.0]]


def test_an_evaluation_lookup_creates_no_row(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with _one_table(cluster) as worker:
        rows = worker.pull_rows("t", torch.tensor([3, 9, 3]), train=False).wait()
        assert torch.equal(rows, torch.ones(3, 2)) and _stats(worker)["rows"] == 0
        worker.pull_rows("t", torch.tensor([3, 9, 3])).wait()
        assert _stats(worker)["rows"] == 2


# ---------------------------------------------------------------------------------------- checkpoints


def test_stopped_and_resumed_with_tables_equals_a_straight_run(make_cluster, worker_procs, tmp_path):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync")
    straight = worker_procs(cluster, "emb_checkpointed", 2, total_steps=10).join(timeout=120)
    for phase, env in (("first", {"PS_CHECKPOINT_EVERY": "7"}), ("resumed", {"PS_RESUME": "1"})):
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync")
        env = {"PS_CHECKPOINT_DIR": str(tmp_path / "ckpt"), **env}
        results = worker_procs(cluster, "emb_checkpointed", 2, env=env, total_steps=10,
                               stop_after=7 if phase == "first" else 0).join(timeout=120)
    assert [r["start_step"] for r in results] == [7, 7]
    for result in results:
        assert torch.equal(result["head"], straight[0]["head"])
        for table in ("items", "users"):
            assert torch.equal(result["rows"][table], straight[0]["rows"][table]), table
        assert result["tables"] == straight[0]["tables"]  # rows, admissions, evictions, steps: the same
    assert straight[0]["tables"][0]["users"]["admissions"] > 0


def test_a_restarted_server_brings_the_tables_back_to_the_checkpoint(make_cluster, tmp_path):
    """Server 1 is killed and restarted after step 4: the tables, like the dense parameters, go
    back to the checkpoint of step 4; the next forward takes the restored model (batch 4 is lost
    with the steps after the checkpoint), and training ends as one process that saw batches 0-3 and
    5-7."""
    import os
    import signal
    import time

    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", restart_servers=True,
                           checkpoint_dir=tmp_path / "ckpt")
    model = models.EmbNet(ps.nn.EmbeddingBag.from_pretrained(models.emb_weight(), mode="sum"))
    worker = ps.init(scheduler=cluster.scheduler)
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker, sparse_optimizer=models.SPARSE_RULES["sparse_adam"],
                                 checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=4) as opt:
        for step in range(8):
            if step == 5:
                os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
                cluster.restart_server(1)
                deadline = time.monotonic() + 20
                while "the job rolled back" not in cluster.output("scheduler", 50) and time.monotonic() < deadline:
                    time.sleep(0.05)
            ids, _, y = models.emb_batch(step)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(ids), y).backward()
            opt.step()
        assert opt.step_count == 7
        rows = worker.pull_rows("bag", torch.arange(models.EMB_ROWS), train=False).wait()
    worker.close()
    want = models.emb_reference("sparse_adam", "sum", False, [0, 1, 2, 3, 5, 6, 7])
    torch.testing.assert_close(rows, want["weight"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.head.weight.detach(), want["head.weight"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------- bad input


@pytest.fixture
def with_tables(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", max_message_bytes=1 << 22)
    model = torch.nn.Module()
    model.fixed = ps.nn.EmbeddingBag(10, 3, mode="sum")
    model.hashed = ps.nn.Embedding(None, 3)
    worker = ps.init(scheduler=cluster.scheduler)
    opt = ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker, sparse_optimizer=ps.optim.SGD(lr=0.1))
    yield model, opt
    opt.close()
    worker.close()


@pytest.mark.parametrize("call,words", [
    (lambda m: m.fixed(torch.tensor([[1.0, 2.0]])), ["'fixed'", "int64", "float32"]),
    (lambda m: m.fixed(torch.tensor([[1, -2]])), ["'fixed'", "0..9", "id -2"]),
    (lambda m: m.fixed(torch.tensor([[1, 10]])), ["'fixed'", "id 10"]),
    (lambda m: m.fixed(torch.tensor([[1, 2]]), torch.tensor([0])), ["2-D input", "no offsets"]),
    (lambda m: m.fixed(torch.tensor([1, 2, 3]), torch.tensor([0, 4])), ["offsets", "within the 3 ids"]),
    (lambda m: m.fixed(torch.tensor([1, 2, 3])), ["needs offsets"]),
    (lambda m: m.hashed(torch.zeros(1 << 20, dtype=torch.int64)), ["'hashed'", "PS_MAX_MESSAGE_BYTES"]),
])
def test_bad_input_is_a_clear_error_and_changes_nothing(with_tables, call, words):
    model, opt = with_tables
    with pytest.raises(ps.ConfigError) as info:
        call(model)
    for word in words:
        assert word in str(info.value), str(info.value)
    # nothing was pulled, nothing is half done: a good step still works
    opt.zero_grad()
    (model.fixed(torch.tensor([[1, 2]])).sum() + model.hashed(torch.tensor([5])).sum()).backward()
    opt.step()


def test_a_table_name_registered_twice_or_differently_is_refused(make_cluster):
    from tests.threads import run_in_threads

    model = torch.nn.Module()
    model.a = ps.nn.Embedding(10, 3, name="same")
    model.b = ps.nn.Embedding(10, 4, name="same")
    with pytest.raises(ps.ConfigError, match="both called 'same'"):
        ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker=object(), sparse_optimizer=ps.optim.SGD(lr=0.1))
    cluster = make_cluster(num_servers=1, num_workers=2)

    def work(i):
        with ps.init(scheduler=cluster.scheduler) as worker:
            table = ps.nn.Embedding(10, 3 + worker.rank)
            try:
                worker.register({}, optimizer=ps.optim.SGD(lr=0.1), tables={"t": table},
                                sparse_optimizer=ps.optim.SGD(lr=0.1))
            except ps.RegistrationError as exc:
                return str(exc)

    for message in run_in_threads(2, work):
        assert message is not None and "table 't'" in message and "dim" in message, message


# ---------------------------------------------------------------------------------------- GPUs


@pytest.mark.gpu
@pytest.mark.parametrize("server_device", ["cpu", "cuda"])
def test_tables_with_gpu_workers_equal_single_process_torch(make_cluster, worker_procs, server_device):
    """The model, and so each batch's rows, on the GPU; the servers' tables in host or GPU memory."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", server_device=server_device)
    results = worker_procs(cluster, "emb_train", 2, rule="sparse_adam", mode="mean", weighted=False, steps=STEPS,
                           device="cuda").join(timeout=120)
    want = models.emb_reference("sparse_adam", "mean", False, STEPS)
    for got in results:
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-5, msg=lambda m: f"{key}: {m}")
