"""Device lanes: GPU workers and GPU servers of one host exchange tensors by CUDA IPC.

All marked ``gpu``: skipped where torch sees no GPU, run on the GPU machine.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import psframework as ps
from psframework import protocol as P

from tests.integration import models
from tests.integration.test_chaos_bugs import wait_for
from tests.integration.test_core import CHUNK
from tests.integration.test_shm import one_async_worker
from tests.integration.worker_tasks import gradient_behind_device_work
from tests.threads import run_in_threads

pytestmark = pytest.mark.gpu
GPU_VS_CPU = {"rtol": 1e-4, "atol": 1e-5}
ONE_BLOCK = 16 << 20  # 4M float32 in one block: its update and copies take long enough to race


def _sync_train(cluster, workers: int, optimizer: str, steps: int) -> list[tuple[dict, list]]:
    """``models`` trained in sync mode by worker threads with their tensors on the GPU; each
    returns its final parameters and the servers' counters."""

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {k: v.cuda() for k, v in models.make_params(17 * worker.rank).items()}
            worker.register(params, optimizer=models.optimizer_spec(optimizer))
            per = models.BATCH // worker.num_workers
            for step in range(steps):
                x, y = (t.cuda() for t in models.batch(step))
                mine = slice(worker.rank * per, (worker.rank + 1) * per)
                leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
                models.loss_fn(leaves, x[mine], y[mine]).backward()
                worker.push_pull({k: v.grad for k, v in leaves.items()}, into=params).wait(timeout=30)
            worker.barrier()
            return {k: v.cpu() for k, v in params.items()}, worker.server_stats()

    return run_in_threads(workers, work)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_sync_through_device_lanes_equals_single_process_training_and_the_lanes(make_cluster, monkeypatch,
                                                                                  optimizer):
    """The same job through device lanes and through the shared-memory lanes (``PS_CUDA_IPC=0``):
    bitwise the same values, equal to one process's training; only the first used CUDA IPC."""
    steps, runs = 5, {}
    for ipc in ("1", "0"):
        monkeypatch.setenv("PS_CUDA_IPC", ipc)
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
        runs[ipc] = _sync_train(cluster, 2, optimizer, steps)
    want = models.reference(optimizer, steps)
    for params, _ in runs["1"] + runs["0"]:
        for key, value in want.items():
            torch.testing.assert_close(params[key], value, **GPU_VS_CPU)
    for (through_ipc, _), (through_lanes, _) in zip(runs["1"], runs["0"]):
        assert all(torch.equal(through_ipc[k], through_lanes[k]) for k in want)
    ipc_stats, lane_stats = runs["1"][0][1], runs["0"][0][1]
    assert [s["device_lanes"] for s in ipc_stats] == [[0, 1], [0, 1]]
    assert all(s["ipc_requests"] >= 2 * steps and s["lane_requests"] == 0 for s in ipc_stats)
    assert [s["device_lanes"] for s in lane_stats] == [[], []]
    assert all(s["ipc_requests"] == 0 and s["lane_requests"] >= 2 * steps for s in lane_stats)


def test_async_pushes_through_device_lanes_are_each_applied_once(make_cluster):
    """Three workers push without waiting for their answers: every push lands exactly once, those
    whose block was still held by an earlier request going over the socket instead."""
    workers, pushes = 3, 30
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="async", chunk_bytes=1 << 18,
                           server_device="cuda")

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"big": torch.zeros(300000, device="cuda"), "small": torch.zeros((), device="cuda")}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            futures = [worker.push({n: torch.full_like(t, float(worker.rank * 100 + k + 1)) for n, t in params.items()})
                       for k in range(pushes)]
            for future in futures:
                future.wait(timeout=30)
            worker.barrier()
            worker.pull(params).wait(timeout=30)
            return {n: t.cpu() for n, t in params.items()}, worker.server_stats(), len(worker.shard_map.blocks)

    expected = -float(sum(r * 100 + k + 1 for r in range(workers) for k in range(pushes)))
    results = run_in_threads(workers, work)
    for params, _, _ in results:
        assert torch.equal(params["big"], torch.full((300000,), expected))
        assert params["small"].item() == expected
    stats, blocks = results[0][1], results[0][2]
    assert sum(s["ipc_requests"] for s in stats) > 0
    assert sum(s["pushes"] for s in stats) == blocks * workers * pushes  # counted per block


def test_a_pull_through_a_device_lane_never_sees_a_block_half_updated(make_cluster):
    """One worker pushes ones into a 16 MiB block (every element goes down by one per push) while
    another pulls it over and over: each pull is one version of the block, every element equal."""
    pushes = 60
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", chunk_bytes=ONE_BLOCK, server_device="cuda")
    done, reading = threading.Event(), threading.Event()  # the writer starts once the reader reads

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(ONE_BLOCK // 4, device="cuda")}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            seen = set()
            if worker.rank == 0:
                assert reading.wait(30), "the reader never read"
                for k in range(pushes):
                    worker.push({"w": torch.full_like(params["w"], float(k % 3 + 1))}).wait(timeout=30)
                done.set()
            else:
                while not done.is_set():
                    worker.pull(params).wait(timeout=30)
                    low, high = params["w"].min().item(), params["w"].max().item()
                    assert low == high, f"a torn pull: elements from {low} to {high}"
                    seen.add(low)
                    reading.set()
            worker.barrier()
            worker.pull(params).wait(timeout=30)
            return params["w"].min().item(), params["w"].max().item(), len(seen), worker.server_stats()

    results = run_in_threads(2, work)
    final = -float(sum(k % 3 + 1 for k in range(pushes)))
    assert all(low == high == final for low, high, _, _ in results)
    assert results[1][2] > 1, "the reader should have seen several versions"
    assert results[0][3][0]["device_lanes"] == [0, 1]


@pytest.mark.parametrize("where", ["host tensors", "server on the host", "PS_CUDA_IPC=0"])
def test_without_cuda_ipc_the_lanes_carry_the_blocks(make_cluster, monkeypatch, caplog, where):
    """No device lane where one side is on the host or IPC is off: the shared-memory lane instead,
    with the same results. Servers on the host are not even offered one (an exported allocation
    that nobody maps makes torch warn when the worker exits)."""
    caplog.set_level("INFO", logger="psframework.worker")
    if where == "PS_CUDA_IPC=0":
        monkeypatch.setenv("PS_CUDA_IPC", "0")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=CHUNK,
                           server_device="cpu" if where == "server on the host" else "cuda")
    device = "cpu" if where == "host tensors" else "cuda"
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(5000, device=device)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(3):
            worker.push_pull({"w": torch.ones(5000, device=device)}, into=params).wait(timeout=30)
        stats = worker.server_stats()[0]
        assert worker.lanes.device_lanes == {} and stats["device_lanes"] == []
        assert stats["lane_requests"] >= 3 and stats["ipc_requests"] == 0
    assert torch.equal(params["w"].cpu(), torch.full((5000,), -3.0))
    if where == "server on the host":
        assert "no device lane" not in caplog.text


def test_host_tensors_of_a_gpu_worker_go_through_its_device_lane(make_cluster):
    """A worker registered with GPU tensors may push and pull host tensors too: copied into and out
    of its device lane."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(5000, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        host = {"w": torch.zeros(5000)}
        worker.push_pull({"w": torch.ones(5000)}, into=host).wait(timeout=30)
        worker.push_pull({"w": torch.ones(5000, device="cuda")}, into=params).wait(timeout=30)
        assert worker.server_stats()[0]["ipc_requests"] >= 2 * 5
    assert torch.equal(host["w"], torch.full((5000,), -1.0))
    assert torch.equal(params["w"].cpu(), torch.full((5000,), -2.0))


def test_an_exchange_dropped_after_answers_came_frees_its_device_lane_blocks_and_writes_nothing(make_cluster,
                                                                                               monkeypatch):
    """Answers through device lanes are copied out once the whole exchange is answered. An exchange
    dropped half-sent (its step failed) never is: the answers that came write nothing, and every
    block's slots are freed, so the next exchange goes through the device lanes whole. (Through the
    direct exchange a server writes the values in place as it answers: ``DistributedOptimizer``
    moves its parameters after a failed step instead, ``test_hazards.py``.)"""
    monkeypatch.setenv("PS_DIRECT_GPU", "0")
    with one_async_worker(make_cluster, "cuda") as (worker, params, grads):
        start = {k: v.clone() for k, v in params.items()}
        blocks = len(worker.shard_map.blocks)
        exchange = worker.exchange(P.PushPull, list(params), params)
        exchange.add("W", grads["W"])
        exchange.send_ready(wait=True)
        assert 0 < exchange.sent_blocks < blocks
        while worker.client.pending:
            worker.progress(0.05)
        exchange.abandon()
        exchange.future.wait(timeout=30)
        torch.cuda.synchronize()
        assert all(torch.equal(params[k], start[k]) for k in params), "a dropped exchange wrote its answers"
        before = worker.server_stats()[0]["ipc_requests"]
        worker.push_pull(grads, into=params).wait(timeout=30)
        assert worker.server_stats()[0]["ipc_requests"] - before == blocks


def test_a_gpu_server_applies_an_exchange_through_device_lanes_in_one_burst(make_cluster):
    """Gradients in device lanes need no upload to overlap: the server holds the complete blocks of
    a sync exchange until its last push and applies them in one optimizer step (with gradients
    uploaded from host memory it goes a quarter of its bytes at a time, test_gpu.py)."""
    cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=200000, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"a": torch.zeros(200000, device="cuda")}  # 4 blocks
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for step in range(3):
            worker.push_pull({"a": torch.ones(200000, device="cuda")}, into=params).wait(timeout=30)
            assert torch.equal(params["a"].cpu(), torch.full((200000,), -float(step + 1)))
        stats = worker.server_stats()[0]
    assert stats["ipc_requests"] == stats["applied"] == 3 * 4
    assert stats["apply_bursts"] == 3 and stats["timed_applies"] == 0


def test_a_restarted_gpu_server_maps_a_fresh_device_lane(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=2, num_workers=1, restart_servers=True, checkpoint_dir=tmp_path / "ckpt",
                           chunk_bytes=CHUNK, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"big": torch.zeros(4000, device="cuda")}  # 16 KB: 4 blocks over both servers
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        ones = {"big": torch.ones(4000, device="cuda")}
        for step in range(3):
            worker.push_pull(ones, into=params).wait(timeout=10)
        worker.save_checkpoint(tmp_path / "ckpt")
        old_lane = worker.lanes.device_lanes[1]
        os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
        cluster.restart_server(1)
        with pytest.raises(ps.RolledBackError):
            worker.push_pull(ones, into=params).wait(timeout=30)
        worker.pull(params).wait(timeout=30)
        assert torch.equal(params["big"].cpu(), torch.full((4000,), -3.0))
        before = worker.server_stats()[1]
        for _ in range(2):
            worker.push_pull(ones, into=params).wait(timeout=30)
        after = worker.server_stats()[1]
        assert worker.lanes.device_lanes[1] is not old_lane
        blocks = len(worker.shard_map.blocks_of_server(1))
        assert after["device_lanes"] == [0] and after["ipc_requests"] - before["ipc_requests"] == 2 * blocks
    assert torch.equal(params["big"].cpu(), torch.full((4000,), -5.0))


@pytest.mark.parametrize("flags", [True, False], ids=["flags", "no stream memory operations"])
def test_a_gpu_jobs_trace_shows_whether_the_worker_waited_for_the_servers_device_work(make_cluster, monkeypatch,
                                                                                        tmp_path, flags):
    """A GPU server answers through a device lane once it has queued its copy. In a device-ordered
    push_pull, with the driver's stream memory operations, the worker queues its copies behind the
    server's flags and never waits on the host: its trace has a span for each such burst, and none
    of host waits. Without them it waits for the server's events before it reads, once per
    exchange, and the trace shows each wait."""
    import json

    from psframework.trace import merge
    from psframework.worker import lanes

    if not flags:
        monkeypatch.setattr(lanes, "memops", lambda: None)
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda",
                           trace_dir=tmp_path / "traces")
    for key, val in cluster.env().items():
        monkeypatch.setenv(key, val)
    with ps.init() as worker:
        params = {"w": torch.zeros(1 << 20, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(3):
            worker.push_pull({"w": torch.ones(1 << 20, device="cuda")}, into=params,
                             device_ordered=True).wait(timeout=30)
    assert set(cluster.wait(timeout=30).values()) == {0}
    assert torch.equal(params["w"].cpu(), torch.full((1 << 20,), -3.0))
    events = json.loads(merge(str(tmp_path / "traces"))[0].read_text())["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    spans = {name: [e for e in events if e["name"] == name]
             for name in ("waited for the servers' device work", "queued the copies behind the servers' flags")}
    waited, queued = spans.values()
    assert len(queued if flags else waited) >= 3 and not (waited if flags else queued)
    assert {tracks[e["pid"]] for e in waited + queued} == {"worker 0"}
    assert all(e["dur"] >= 0 for e in waited + queued)


def test_a_device_ordered_push_pull_is_read_by_the_callers_next_kernels_without_a_wait(make_cluster):
    """``push_pull(device_ordered=True)`` of GPU tensors through a device lane queues the copies of
    the values behind the server's flags and orders the caller's stream after them: kernels queued
    next read the new values with no ``wait()``, over several steps in a row; a host destination
    among them makes the future an ordinary one."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda", chunk_bytes=ONE_BLOCK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        numel = ONE_BLOCK // 4
        params = {"w": torch.zeros(numel, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        futures, seen = [], []
        for _ in range(3):
            if futures:  # the last step's answers free the lane's slots (as DistributedOptimizer does)
                futures[-1].wait(timeout=30)
            futures.append(worker.push_pull({"w": torch.ones(numel, device="cuda")}, into=params,
                                            device_ordered=True))
            seen.append(params["w"].sum())  # queued on our stream right away: after the copy of the values
        assert all(future.ordered_on_device for future in futures)
        assert [float(total) for total in seen] == [-numel, -2.0 * numel, -3.0 * numel]
        futures[-1].wait(timeout=30)
        assert worker.steps == 3

    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(1000, device="cuda"), "h": torch.zeros(10)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        future = worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params,
                                  device_ordered=True)
        assert not future.ordered_on_device
        future.wait(timeout=30)
        assert torch.equal(params["h"], torch.full((10,), -1.0))


def test_a_distributed_optimizer_without_overlap_leaves_a_device_ordered_step_to_the_gpu(make_cluster):
    """Without overlap, ``DistributedOptimizer.step()`` of a GPU model with a GPU server of this host
    returns once its requests are sent, the values' copies queued behind the server's flags; the
    next step (or ``step_count``, or ``close``) takes the answers in. The training equals plain
    torch.optim's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    reference = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)).cuda()
    reference.load_state_dict(model.state_dict())
    local = torch.optim.SGD(reference.parameters(), lr=0.1)
    x, y = torch.randn(32, 64, device="cuda"), torch.randn(32, 1, device="cuda")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker=worker, overlap=False) as opt:
            for step in range(4):
                for net, optimizer in ((model, opt), (reference, local)):
                    optimizer.zero_grad()
                    torch.nn.functional.mse_loss(net(x), y).backward()
                    optimizer.step()
                assert opt._unfinished is not None and opt._unfinished.ordered_on_device
            assert opt.step_count == 4 and opt._unfinished is None
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine, want, **GPU_VS_CPU)


def test_a_push_uploaded_onto_a_held_device_lane_slot_is_summed_once_it_has_landed(make_cluster):
    """A sync step of one 64 MiB block: worker 0's push_pull through its device lane comes first and
    is read where it is; worker 1's, of host tensors, comes second and is uploaded to the GPU. The
    sum must wait for that upload (an add queued at once read a half-landed gradient)."""
    import time

    numel = 16 << 20
    cluster = make_cluster(num_servers=1, num_workers=2, mode="sync", server_device="cuda", chunk_bytes=64 << 20)

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            device = "cuda" if worker.rank == 0 else "cpu"
            params = {"w": torch.zeros(numel, device=device)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            for step in range(3):
                if worker.rank == 1:
                    time.sleep(0.3)  # after worker 0's push
                grad = torch.full((numel,), float((worker.rank + 1) * (step + 1)), device=device)
                worker.push_pull({"w": grad}, into=params).wait(timeout=30)
            worker.barrier()
            return params["w"].cpu(), worker.server_stats()[0]

    results = run_in_threads(2, work)
    for values, _ in results:
        assert torch.equal(values, torch.full((numel,), -9.0))  # the means 1.5, 3 and 4.5
    assert results[0][1]["ipc_requests"] >= 3 and results[0][1]["lane_requests"] >= 3


def test_three_workers_gradients_uploaded_to_a_gpu_server_are_summed_without_losing_one(make_cluster, monkeypatch):
    """Three workers' pushes of one 64 MiB block through their lanes are uploaded to the GPU and
    summed at the step: the sum into the first must add each of the other two, one after the other
    (a single CUDA ``_foreach_add_`` given one target twice lost one of them)."""
    monkeypatch.setenv("PS_CUDA_IPC", "0")
    numel = 16 << 20
    cluster = make_cluster(num_servers=1, num_workers=3, mode="sync", server_device="cuda", chunk_bytes=64 << 20)

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(numel, device="cuda")}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            for _ in range(2):
                grad = torch.full((numel,), float(worker.rank + 1), device="cuda")
                worker.push_pull({"w": grad}, into=params).wait(timeout=30)
            worker.barrier()
            return params["w"].cpu()

    for values in run_in_threads(3, work):
        assert torch.equal(values, torch.full((numel,), -4.0))  # twice the mean of 1, 2 and 3


# -- the worker's wait for a server's event, against a server-like process of our own ----------------

_SLOT_FLOATS = 1 << 20


def _server_side(attach: bytes, matmuls: int, conn) -> None:
    """Map the lane, send our answer to it, and on "go" answer as a GPU server does: queue the
    device work (``matmuls`` products of two 16384 x 16384 matrices, about 0.15 s each on an H200,
    then the values into the pull slot of block 0), record block 0's event and write 1 into its
    flag, and say "answered" at once, before the device work is done."""
    from psframework import protocol as P
    from psframework.datapath.cuda_ipc import DeviceLane
    from psframework.datapath.peer_process import start_time

    device = torch.device("cuda", torch.cuda.current_device())
    lane = DeviceLane.attach(P.decode(attach), [(0, _SLOT_FLOATS * 4)], device)
    conn.send(P.encode(P.Attached(req=0, events=lane.make_events(device), pid=os.getpid(),
                                  started=start_time(os.getpid()))))
    a = torch.randn(16384, 16384, device=device)
    slot = lane.piece(True, 0, 0, _SLOT_FLOATS * 4, torch.float32)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):  # every kernel loaded now: loading one lazily waits for the work queued
        torch.tanh(a @ a)
        slot.fill_(0.0)
    torch.cuda.synchronize()
    conn.recv()
    with torch.cuda.stream(stream):
        for _ in range(matmuls):
            a = torch.tanh(a @ a)
        slot.fill_(7.0)
        lane.written[0].record(stream)
        lane.write_flag(stream, 0, 1)
    conn.send("answered")
    conn.recv()  # stay until told (or killed): our context holds the work
    torch.cuda.synchronize()


@pytest.fixture
def lane_and_server():
    """A device lane of one block and a spawned process that maps it as a server would."""
    import multiprocessing

    from psframework import protocol as P
    from psframework.datapath.cuda_ipc import DeviceLane

    def start(matmuls: int):
        lane = DeviceLane.create(torch.device("cuda"), [(0, _SLOT_FLOATS * 4)])
        parent, child = multiprocessing.get_context("spawn").Pipe()
        process = multiprocessing.get_context("spawn").Process(
            target=_server_side, args=(P.encode(lane.export(0, 1)), matmuls, child), daemon=True)
        process.start()
        started.append((lane, process, parent))
        assert parent.poll(60), "the server-like process did not map the lane"
        lane.open_events(P.decode(parent.recv()), server=0)
        return lane, process, parent

    started = []
    yield start
    for lane, process, parent in started:
        process.kill()
        process.join(10)
        lane.close()


def test_a_worker_reads_the_pull_slot_only_once_the_servers_event_completed(lane_and_server):
    """The server's answer comes while its copy into the pull slot is still queued behind about 0.3 s
    of device work: its event has not completed then, and ``wait_written`` returns only once the
    values are there."""
    lane, process, conn = lane_and_server(matmuls=2)
    conn.send("go")
    assert conn.poll(30)
    assert conn.recv() == "answered"
    slot = lane.piece(True, 0, 0, _SLOT_FLOATS * 4, torch.float32)
    assert not lane.written[0].query()  # the answer went before the device work: reading now would tear
    assert lane.wait_written(0, lambda: None, server=0) is None
    assert torch.equal(slot, torch.full_like(slot, 7.0))
    conn.send("exit")


def _copy_after_flag(lane, number: int) -> tuple[torch.Tensor, "torch.cuda.Event"]:
    """Queue, on a stream of ours, a wait for block 0's flag to reach ``number`` and a copy of the
    pull slot after it; the copy's target and an event recorded after it."""
    stream = torch.cuda.Stream()
    target = torch.zeros(_SLOT_FLOATS, device="cuda")
    lane.wait_flag(stream, 0, number)
    with torch.cuda.stream(stream):
        target.copy_(lane.piece(True, 0, 0, _SLOT_FLOATS * 4, torch.float32))
    copied = torch.cuda.Event()
    copied.record(stream)
    return target, copied


def test_a_workers_stream_copies_the_pull_slot_only_once_the_servers_flag_is_written(lane_and_server):
    """The copy out of the pull slot is queued behind a wait for the server's flag as soon as the
    answer is in: our host goes on at once, and the copy reads the values only once the server's
    device work (about 0.3 s) wrote them and then the flag."""
    lane, process, conn = lane_and_server(matmuls=2)
    conn.send("go")
    assert conn.poll(30) and conn.recv() == "answered"
    target, copied = _copy_after_flag(lane, 1)
    assert not copied.query()  # queued, not done: the server's work is still running
    copied.synchronize()
    assert torch.equal(target, torch.full_like(target, 7.0))
    assert lane.flag_value(0) == 1
    conn.send("exit")


def test_a_server_killed_before_writing_its_flag_leaves_no_stream_of_ours_waiting(lane_and_server):
    """A server killed with its device work (about 20 s) in flight never writes its flag: the
    worker's watch writes it instead within seconds of the death, so our stream (and every stream
    ordered after it) goes on, and the worker's next request raises PeerLostError naming the server."""
    import time

    from psframework.datapath.cuda_ipc import FlagWatch

    lane, process, conn = lane_and_server(matmuls=130)
    conn.send("go")
    assert conn.poll(30) and conn.recv() == "answered"
    _, copied = _copy_after_flag(lane, 1)
    watch = FlagWatch(torch.device("cuda"))
    try:
        watch.watch(lane, 0, {0: 1}, [copied])
        time.sleep(0.5)
        watch.check()  # nothing to report while the server lives
        assert not copied.query(), "the server's device work ended before it was killed"
        os.kill(process.pid, signal.SIGKILL)
        killed = time.monotonic()
        while not copied.query():
            assert time.monotonic() - killed < 5, "our stream still waits for a dead server's flag"
            time.sleep(0.01)
        with pytest.raises(ps.PeerLostError, match="server 0"):
            watch.check()
        watch.check()  # raised once
    finally:
        watch.close()


def test_a_server_killed_with_device_work_in_flight_is_an_error_within_seconds(lane_and_server):
    """A server killed while its event waits behind about 20 s of device work: its event then reads
    as complete, or never completes; either way the worker's wait ends with PeerLostError within
    seconds, and never with the pull slot taken as written."""
    lane, process, conn = lane_and_server(matmuls=130)
    conn.send("go")
    assert conn.poll(30) and conn.recv() == "answered"

    def alive() -> None:
        if not process.is_alive():
            raise ps.PeerLostError(f"server 0 (pid {process.pid}) died", role="server", rank=0)

    error = _killed_while_waiting(process, lambda: lane.wait_written(0, alive, server=0), lane.written[0])
    assert isinstance(error, ps.PeerLostError) and "server 0" in str(error)


def _killed_while_waiting(process, wait, event: "torch.cuda.Event"):
    """Start ``wait()`` (a wait for the peer's ``event``) on a thread, kill the peer once the wait
    is under way with the event still pending, and return what the wait returned: within seconds of
    the kill (a GPU-side wait on a dead process's event never ends, so the host must notice)."""
    import time

    result = []
    waiter = threading.Thread(target=lambda: result.append(wait()), daemon=True)
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive() and not event.query(), "the peer's device work ended before it was killed"
    os.kill(process.pid, signal.SIGKILL)
    killed = time.monotonic()
    waiter.join(10)
    assert not waiter.is_alive(), "the wait did not end after its peer was killed"
    assert time.monotonic() - killed < 5
    return result[0]


# -- the server's wait for a worker's push event, against a worker-like process of our own -------------

def _worker_side(matmuls: int, conn) -> None:
    """Make a device lane of one block and send its offer; on "go" push as a GPU worker does: queue
    the device work (``matmuls`` products as in ``_server_side``, then the gradients into the push
    slot of block 0), record block 0's push event, and say "pushed" at once, before the device work
    is done."""
    from psframework import protocol as P
    from psframework.datapath.cuda_ipc import DeviceLane

    device = torch.device("cuda", torch.cuda.current_device())
    lane = DeviceLane.create(device, [(0, _SLOT_FLOATS * 4)])
    a = torch.randn(16384, 16384, device=device)
    slot = lane.piece(False, 0, 0, _SLOT_FLOATS * 4, torch.float32)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        torch.tanh(a @ a)
        slot.fill_(0.0)
    torch.cuda.synchronize()
    conn.send(P.encode(lane.export(0, 1)))
    conn.recv()  # the server has opened our events: records from now on are seen there
    with torch.cuda.stream(stream):
        for _ in range(matmuls):
            a = torch.tanh(a @ a)
        slot.fill_(7.0)
        lane.record_pushed(0, stream)
    conn.send("pushed")
    conn.recv()
    torch.cuda.synchronize()


@pytest.fixture
def worker_and_lane():
    """A spawned process that offers a device lane of one block as a worker would, mapped here."""
    import multiprocessing

    from psframework import protocol as P
    from psframework.datapath.cuda_ipc import DeviceLane

    def start(matmuls: int):
        parent, child = multiprocessing.get_context("spawn").Pipe()
        process = multiprocessing.get_context("spawn").Process(target=_worker_side, args=(matmuls, child),
                                                               daemon=True)
        process.start()
        started.append(process)
        assert parent.poll(60), "the worker-like process did not offer its lane"
        device = torch.device("cuda", torch.cuda.current_device())
        lanes.append(DeviceLane.attach(P.decode(parent.recv()), [(0, _SLOT_FLOATS * 4)], device))
        return lanes[-1], process, parent

    started, lanes = [], []
    yield start
    for process in started:
        process.kill()
        process.join(10)
    for lane in lanes:
        lane.close()


def test_a_server_reads_the_push_slot_only_once_the_workers_event_completed(worker_and_lane):
    """The worker's push comes while its copy into the push slot is still queued behind about 0.3 s
    of device work: its event has not completed then, and ``wait_pushed`` returns only once the
    gradients are there."""
    lane, process, conn = worker_and_lane(matmuls=2)
    conn.send("go")
    assert conn.poll(30) and conn.recv() == "pushed"
    slot = lane.piece(False, 0, 0, _SLOT_FLOATS * 4, torch.float32)
    assert not lane.pushed[0].query()  # the push went before the copy: reading now would tear
    assert lane.wait_pushed(0, worker=0) is None
    assert torch.equal(slot, torch.full_like(slot, 7.0))
    conn.send("exit")


def test_a_worker_killed_with_its_copy_in_flight_is_an_error_for_the_server_within_seconds(worker_and_lane):
    """A worker killed while its push event waits behind about 20 s of device work: the server's
    wait ends with PeerLostError naming the worker within seconds, never with the slot taken as pushed."""
    lane, process, conn = worker_and_lane(matmuls=130)
    conn.send("go")
    assert conn.poll(30) and conn.recv() == "pushed"
    error = _killed_while_waiting(process, lambda: lane.wait_pushed(0, worker=0), lane.pushed[0])
    assert isinstance(error, ps.PeerLostError) and "worker 0" in str(error)


def test_a_push_sent_while_its_gradients_are_still_computed_is_applied_with_them(make_cluster):
    """The header of a push through a device lane goes before the copy into the push slot is done,
    here before the gradients themselves are computed (behind about 0.3 s of device work): the
    server applies them, not what the slot held from the push before."""
    numel = ONE_BLOCK // 4
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=ONE_BLOCK, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(numel, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        worker.push_pull({"w": torch.ones(numel, device="cuda")}, into=params).wait(timeout=30)
        future = worker.push_pull({"w": gradient_behind_device_work(numel, seconds=0.3)}, into=params)
        future.wait(timeout=30)
        assert torch.equal(params["w"].cpu(), torch.full((numel,), -3.0))
        assert worker.server_stats()[0]["ipc_requests"] >= 2


def test_a_push_whose_gradients_are_still_computed_holds_back_no_other_workers_requests(make_cluster):
    """A device-lane push comes while its gradients are still computed, behind about 3 s of device
    work on a stream of the worker's own: the server holds it (``server/held.py``) and answers
    another worker's push_pull meanwhile, then applies the held push with its gradients."""
    numel = ONE_BLOCK // 4
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", chunk_bytes=ONE_BLOCK, server_device="cuda")
    sent, answered = threading.Barrier(2, timeout=60), threading.Barrier(2, timeout=60)
    seen = {}

    def slow_worker(worker, params):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            grad = gradient_behind_device_work(numel, seconds=3.0)
            seen["computed"] = torch.cuda.Event()
            seen["computed"].record(stream)
            future = worker.push_pull({"w": grad}, into=params)
        sent.wait()
        answered.wait()
        future.wait(timeout=60)

    def other_worker(worker, params):
        sent.wait()
        worker.push_pull({"w": torch.ones(numel)}, into=params).wait(timeout=30)
        seen["answered while the gradients were computed"] = not seen["computed"].query()
        answered.wait()

    def work(i):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(numel, device="cuda" if i == 0 else "cpu")}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            (slow_worker if i == 0 else other_worker)(worker, params)
            worker.barrier()
            worker.pull(params).wait(timeout=30)
            return params["w"].cpu(), worker.server_stats()[0]

    results = run_in_threads(2, work, timeout=120)
    assert seen["answered while the gradients were computed"]
    for values, _ in results:
        assert torch.equal(values, torch.full((numel,), -3.0))  # SGD(lr=1) of ones, then of twos
    assert results[0][1]["held_requests"] >= 1 and results[0][1]["ipc_requests"] >= 1


def test_a_worker_killed_while_its_push_is_held_holds_up_nothing(make_cluster, worker_procs, tmp_path):
    """Worker 0 (``worker_tasks.py:held_then_killed``) pushes through its device lane while its
    gradients are still computed, seconds of device work away; the server holds the push, and worker
    0 is killed. Worker 1's push_pull is then answered within seconds, the killed worker's push
    is never applied, and the server goes on."""
    numel = ONE_BLOCK // 4
    flags = tmp_path / "flags"
    flags.mkdir()
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True, chunk_bytes=ONE_BLOCK,
                           server_device="cuda")
    victim = worker_procs(cluster, "held_then_killed", 1, flag_dir=str(flags), numel=numel)
    with ps.init(scheduler=cluster.scheduler, rank=1) as worker:
        params = {"w": torch.zeros(numel)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        wait_for(lambda: (flags / "sent").exists(), 60, "worker 0's push")
        wait_for(lambda: worker.server_stats()[0]["held_requests"] >= 1, 10,
                 f"the server holding worker 0's push ({(flags / 'sent').read_text()})")
        os.kill(victim.procs[0].pid, signal.SIGKILL)
        started = time.monotonic()
        worker.push_pull({"w": torch.ones(numel)}, into=params).wait(timeout=30)
        assert time.monotonic() - started < 5
        assert torch.equal(params["w"], torch.full((numel,), -1.0))  # SGD(lr=1) of our ones only
        time.sleep(1.0)  # the held push's turn has come (the worker's process is gone)
        worker.pull(params).wait(timeout=10)
        assert torch.equal(params["w"], torch.full((numel,), -1.0))
        assert worker.server_stats()[0]["held_requests"] >= 1
    assert cluster.processes()["server-0"].poll() is None
