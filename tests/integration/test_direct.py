"""The direct exchange on one host (``worker/direct.py``): a server reads a worker's gradients and
writes its values where they lie, in host memory that ``shared_empty`` made, against the lanes."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path

import pytest
import torch

import psframework as ps
from psframework import protocol as P
from psframework.datapath.lane import shm_available
from psframework.errors import ConfigError
from tests.integration import models
from tests.integration.test_core import CHUNK
from tests.threads import run_in_threads

pytestmark = pytest.mark.skipif(not shm_available(), reason="no memfd_create or /proc/PID/fd on this system")
STEPS = 3


def _shared_like(worker, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors``, each in shared host memory of its own."""
    out = {}
    for name, tensor in tensors.items():
        out[name] = worker.lanes.direct.shared_empty(tensor.numel(), tensor.dtype).view(tensor.shape)
        out[name].copy_(tensor)
    return out


def _packed_like(worker, block, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` as views of one shared buffer laid out like ``block`` (its segments'
    offsets): the block is then one region of the worker's memory."""
    flat = worker.lanes.direct.shared_empty(block.numel, torch.float32)
    out = {}
    for seg in block.segments:
        out[seg.key] = flat[seg.block_offset:seg.block_offset + seg.numel].view(tensors[seg.key].shape)
        out[seg.key].copy_(tensors[seg.key])
    return out


def _train(worker, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """``STEPS`` steps of the test model: gradients into ``grads``, pushed, values pulled into ``params``."""
    for step in range(STEPS):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        models.loss_fn(leaves, *models.batch(step)).backward()
        for name, leaf in leaves.items():
            grads[name].copy_(leaf.grad)
        worker.push_pull(grads, into=params).wait(timeout=30)


def _reference() -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_(True) for k, v in models.make_params(0).items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        models.loss_fn(params, *models.batch(step)).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize("direct", ["1", "0"])
def test_shared_tensors_are_exchanged_where_they_lie_with_torchs_numbers(make_cluster, monkeypatch, direct):
    monkeypatch.setenv("PS_DIRECT", direct)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        start = models.make_params(0)
        worker.register(start, optimizer=ps.optim.SGD(lr=0.1))
        params = _shared_like(worker, start)
        grads = _shared_like(worker, {k: torch.zeros_like(v) for k, v in start.items()})
        _train(worker, params, grads)
        stats = worker.server_stats()
        # a block of one tensor's piece is one region; the packed block of three small tensors,
        # each in a file of its own here, is not: it goes through the lane
        single = [b for b in worker.shard_map.blocks if len(b.segments) == 1]
        assert 0 < len(single) < len(worker.shard_map.blocks)
        # the first step introduces the exports to the servers (MapExports) and goes through the lanes
        assert sum(s["direct_requests"] for s in stats) == ((STEPS - 1) * len(single) if direct == "1" else 0)
        assert sum(s["lane_requests"] for s in stats) == STEPS * len(worker.shard_map.blocks)
        # every request names its exports' handles; each server opened each once: the values and the
        # gradient of each tensor it has a block of one segment of
        opened = 2 * len({(b.server, b.segments[0].key) for b in single})
        assert sum(s["mapped_exports"] for s in stats) == (opened if direct == "1" else 0)
    want = _reference()
    for name in want:
        torch.testing.assert_close(params[name], want[name], rtol=1e-5, atol=1e-6)


def test_ordinary_tensors_still_go_through_the_lanes(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        start = {k: v.clone() for k, v in params.items()}
        worker.push_pull(grads, into=params).wait(timeout=30)
        stats = worker.server_stats()
        assert sum(s["direct_requests"] for s in stats) == 0
        assert sum(s["lane_requests"] for s in stats) == len(worker.shard_map.blocks)
    for key in params:
        torch.testing.assert_close(params[key], start[key] - 0.5)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_an_export_the_server_cannot_map_goes_through_the_lane_and_no_exchange_fails(make_cluster, monkeypatch, mode):
    """A server that cannot map a worker's export says so when the worker introduces it, before
    any request names it: the block goes through the lane in that very exchange, nothing fails and
    nothing is applied twice (a failed exchange would leave a sync step without this worker)."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode=mode, chunk_bytes=1 << 20)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(1000)}, optimizer=ps.optim.SGD(lr=1.0))
        memory = worker.lanes.direct.host_memory
        param, grad = (memory.empty(1000, torch.float32) for _ in range(2))
        grad.fill_(-1.0)
        real = memory.ipc_handle
        monkeypatch.setattr(memory, "ipc_handle", lambda base: b"\0" * 16 + real(base)[16:])  # a wrong token
        for step in range(3):
            worker.push_pull({"w": grad}, into={"w": param}).wait(timeout=30)
            assert torch.equal(param, torch.full((1000,), step + 1.0))
        [stats] = worker.server_stats()
    assert stats["direct_requests"] == 0 and stats["mapped_exports"] == 0 and stats["lane_requests"] == 3
    assert stats["exports_refused"] == 2  # introduced together, the gradients' and the destination's


def test_memory_made_anew_every_step_is_let_go_by_the_server_though_none_goes_direct(make_cluster):
    """Gradients in new shared memory every step: each step's goes through the lane while the
    server is told of it, and the server lets go of the last step's, told with that introduction."""
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async")
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(1000)}, optimizer=ps.optim.SGD(lr=1.0))
        direct = worker.lanes.direct
        param = direct.shared_empty(1000, torch.float32)
        for _ in range(5):
            grad = direct.shared_empty(1000, torch.float32)
            grad.fill_(-1.0)
            worker.push_pull({"w": grad}, into={"w": param}).wait(timeout=30)
            direct.free([grad])
        [stats] = worker.server_stats()
    assert torch.equal(param, torch.full((1000,), 5.0))
    assert stats["direct_requests"] == 0 and stats["exports_opened"] == 6
    assert stats["mapped_exports"] == 2  # the parameters' and the last gradients'


def _mapped_exports(pid: int) -> set[str]:
    """The shared allocations of workers (``memfd:psf-PID-export-N``) that process ``pid`` maps."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return {line.split()[-2] for line in maps.splitlines() if "memfd:psf-" in line and "-export-" in line}


def _wait_for(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"not within {seconds} s: {what}"
        time.sleep(0.05)


def test_the_exports_of_a_dead_worker_are_unmapped_by_the_server(make_cluster, worker_procs, tmp_path):
    """An elastic job goes on without a worker that died; its server lets go of the memory of that
    worker it mapped for the direct exchange (the survivor's stays mapped)."""
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True)
    server = cluster.processes()["server-0"]
    flags = tmp_path / "flags"
    flags.mkdir()
    procs = worker_procs(cluster, "direct_then_die", 2, flag_dir=str(flags), victim=1)
    _wait_for(lambda: all((flags / f"done-{rank}").exists() for rank in (0, 1)), 30,
              "both workers pushed")
    pids = {rank: procs.procs[rank].pid for rank in (0, 1)}
    mapped = _mapped_exports(server.pid)
    assert all(any(f"psf-{pid}-export-" in name for name in mapped) for pid in pids.values()), (pids, mapped)
    (flags / "die").touch()
    assert procs.procs[1].wait(timeout=10) == 17
    _wait_for(lambda: not any(f"psf-{pids[1]}-export-" in name for name in _mapped_exports(server.pid)), 30,
              "the dead worker's memory unmapped")
    assert any(f"psf-{pids[0]}-export-" in name for name in _mapped_exports(server.pid))
    (flags / "finish").touch()
    assert procs.join_one(0, timeout=30)["direct"] >= 4  # both workers' pushes went direct
    procs.join(expect_ok=False)


def test_a_restarted_server_maps_the_workers_memory_anew(make_cluster, tmp_path):
    """Server 1 is killed and started again: the job goes back to the checkpoint, and requests
    resent to the new process, and new ones, name the handles of the exports they use, which it
    opens once; the values are those of the checkpoint plus the steps after it."""
    from tests.integration.test_chaos_bugs import restart_server, restartable
    cluster = restartable(make_cluster, tmp_path)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"big": torch.zeros(4000)}, optimizer=ps.optim.SGD(lr=1.0))
        param, grad = (worker.lanes.direct.shared_empty(4000, torch.float32) for _ in range(2))
        grad.fill_(1.0)
        for _ in range(2):
            worker.push_pull({"big": grad}, into={"big": param}).wait(timeout=30)
        worker.save_checkpoint(tmp_path / "ckpt")
        restart_server(cluster, 1)
        done = 0
        deadline = time.monotonic() + 30
        while done < 2:
            try:
                worker.push_pull({"big": grad}, into={"big": param}).wait(timeout=30)
                done += 1
            except ps.RolledBackError:
                assert time.monotonic() < deadline
        stats = worker.server_stats()
        assert stats[1]["direct_requests"] >= 2 and stats[1]["mapped_exports"] == 2, stats[1]
    torch.testing.assert_close(param, torch.full((4000,), -4.0))


def test_two_workers_in_sync_whose_gradients_the_server_holds_where_they_lie_get_torchs_bits(make_cluster):
    """The server keeps views of both workers' gradients in their memory until the step, and writes
    the values into both workers' parameters: the bits of torch's fused SGD on the sum."""
    from tests.integration.test_shm import (TWO_WORKERS_SGD, TWO_WORKERS_SIZES, fused_sgd_on_the_sum,
                                            two_workers_grads, two_workers_start)
    cluster = make_cluster(num_servers=1, num_workers=2, mode="sync")

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            start = two_workers_start()
            worker.register(start, optimizer=ps.optim.SGD(**TWO_WORKERS_SGD))
            [block] = worker.shard_map.blocks  # both tensors packed into one block: one region each way
            params, pushed = (_packed_like(worker, block, start) for _ in range(2))
            for step in range(3):
                for k, g in two_workers_grads(worker.rank, step).items():
                    pushed[k].copy_(g)
                worker.push_pull(pushed, into=params).wait()
            return {k: v.clone() for k, v in params.items()}, worker.server_stats()

    results = run_in_threads(2, work)
    want = fused_sgd_on_the_sum(3)
    for params, stats in results:
        assert stats[0]["direct_requests"] == 2 * 2  # two workers, three steps (the first introduces), one block
        for k in TWO_WORKERS_SIZES:
            assert torch.equal(params[k], want[k]), k


# ------------------------------------------------------------------------------ GPU tensors (CUDA IPC)

GPU_BLOCK = 1 << 20  # bytes: the GPU tests' tensors are a few blocks of one segment each


@pytest.mark.gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_gpu_sync_through_the_direct_exchange_equals_the_device_lanes_bitwise(make_cluster, monkeypatch, optimizer):
    """Two GPU workers in sync with two GPU servers, with and without the direct exchange
    (``PS_DIRECT_GPU``): the same bits, equal to one process's training; while one worker's
    gradients are applied the other's pulls are answered (never torn: both runs agree)."""
    from tests.integration.test_cuda_ipc import GPU_VS_CPU, _sync_train
    steps, runs = 5, {}
    for direct in ("1", "0"):
        monkeypatch.setenv("PS_DIRECT_GPU", direct)
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
        runs[direct] = _sync_train(cluster, 2, optimizer, steps)
    want = models.reference(optimizer, steps)
    for (direct, _), (lanes, _) in zip(runs["1"], runs["0"]):
        assert all(torch.equal(direct[k], lanes[k]) for k in want)
        for key, value in want.items():
            torch.testing.assert_close(direct[key], value, **GPU_VS_CPU)
    assert sum(s["direct_requests"] for s in runs["1"][0][1]) > 0
    assert sum(s["direct_requests"] for s in runs["0"][0][1]) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("empty_cache", [False, True])
def test_gpu_async_pushes_through_the_direct_exchange_are_each_applied_once(make_cluster, worker_procs, empty_cache):
    """Every push of a GPU worker lands once through the direct exchange; with the allocator's cache
    emptied between steps the exports are made anew and the server lets the old ones go. The
    tensors are 16 MiB: the allocator gives each a segment of its own, which empty_cache frees."""
    steps, numel = 10, 16 * GPU_BLOCK // 4
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=GPU_BLOCK, server_device="cuda")
    [result] = worker_procs(cluster, "gpu_count_up", 1, env={"PS_DIRECT_GPU": "1"}, steps=steps, numel=numel,
                            empty_cache=empty_cache, repeats=2).join()
    assert torch.equal(result["w"], torch.full((numel,), float(2 * steps)))
    [stats] = result["stats"]
    # each allocation's first exchange introduces it (MapExports) and goes through the lane: with the
    # cache emptied that is each step's first; else the first step's (and the next's, whose new
    # gradients may take another segment while the old are still held)
    assert stats["ipc_requests"] == 2 * 16 * steps
    assert stats["direct_requests"] == 16 * steps if empty_cache else stats["direct_requests"] >= 16 * (2 * steps - 2)
    # w's allocation and the gradients': two that take turns, or a new one each step, the old let go
    assert stats["exports_opened"] >= steps if empty_cache else stats["exports_opened"] <= 3
    assert stats["mapped_exports"] <= 3


@pytest.mark.gpu
def test_gpu_memory_the_driver_cannot_export_goes_through_the_device_lane(make_cluster, worker_procs):
    """``expandable_segments`` allocates with ``cuMemCreate``, which legacy CUDA IPC cannot export:
    the same results through the device lane, and no direct request."""
    steps, numel = 5, 3 * GPU_BLOCK // 4
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=GPU_BLOCK, server_device="cuda")
    env = {"PS_DIRECT_GPU": "1", "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    [result] = worker_procs(cluster, "gpu_count_up", 1, env=env, steps=steps, numel=numel).join()
    assert torch.equal(result["w"], torch.full((numel,), float(steps)))
    [stats] = result["stats"]
    # the device lane itself is in such memory: torch shares it another way, which may be refused too
    assert stats["direct_requests"] == 0 and stats["ipc_requests"] == (3 * steps if stats["device_lanes"] else 0)


@pytest.mark.gpu
def test_gpu_device_ordered_steps_through_the_direct_exchange(make_cluster, monkeypatch):
    """``push_pull(device_ordered=True)`` through the direct exchange: the caller's next kernels
    see the new values without a wait on the host (the server's flag orders them)."""
    monkeypatch.setenv("PS_DIRECT_GPU", "1")
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=GPU_BLOCK, server_device="cuda")
    numel = 3 * GPU_BLOCK // 4
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(numel, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        grads = {"w": torch.full((numel,), -1.0, device="cuda")}
        seen = []
        for _ in range(5):
            future = worker.push_pull(grads, into=params, device_ordered=True)
            seen.append(params["w"].sum())  # queued behind the server's write, not waited for
            future.wait(timeout=30)
        stats = worker.server_stats()
    assert [float(s) for s in seen] == [float(numel * (i + 1)) for i in range(5)]
    assert stats[0]["direct_requests"] == 3 * 4  # the first introduces the exports (MapExports)


@pytest.mark.gpu
def test_gpu_a_direct_push_records_its_event_only_behind_unfinished_device_work(make_cluster, monkeypatch):
    """A direct request's push event is recorded (work in the worker's CUDA context, which the GPU
    switches to before the server's kernels) only where the gradient or the caller's stream still
    has work queued: after a synchronize none is, and the server goes at once (but the exchange's
    own ordering queues event records on the caller's stream, which the GPU may not have run when
    the request goes: so of three such round trips one at least records none); behind about 0.3 s
    of device work it is, and the server steps by the gradient made after that work."""
    from psframework.datapath.cuda_ipc import DeviceLane
    from tests.integration.worker_tasks import gradient_behind_device_work
    monkeypatch.setenv("PS_DIRECT_GPU", "1")
    record, recorded = DeviceLane.record_pushed, []

    def counted(lane, block_id, stream):
        recorded.append(block_id)
        record(lane, block_id, stream)
    monkeypatch.setattr(DeviceLane, "record_pushed", counted)
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=GPU_BLOCK, server_device="cuda")
    numel = GPU_BLOCK // 4
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(numel, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        gradient_behind_device_work(1, seconds=0.001)  # loads the kernel's module (see its docstring)
        grad = torch.ones(numel, device="cuda")
        for _ in range(2):  # the first introduces the allocations (MapExports) and goes through the lane
            worker.push_pull({"w": grad}, into=params).wait(timeout=30)
        direct_before = worker.server_stats()[0]["direct_requests"]
        recorded.clear()
        for _ in range(3):
            torch.cuda.synchronize()
            worker.push_pull({"w": grad}, into=params).wait(timeout=30)
        assert len(recorded) < 3 and torch.equal(params["w"].cpu(), torch.full((numel,), -5.0))
        recorded.clear()
        grad.copy_(gradient_behind_device_work(numel, seconds=0.3))
        worker.push_pull({"w": grad}, into=params).wait(timeout=30)
        assert recorded == [0] and torch.equal(params["w"].cpu(), torch.full((numel,), -7.0))
        assert worker.server_stats()[0]["direct_requests"] == direct_before + 4


def _adam_reference(steps: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = models.OverlapNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for step in range(steps):
        opt.zero_grad()
        x, y = models.overlap_batch(step)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _in_views(opt, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lies in one of the buffers of ``opt``'s mapped parameters."""
    return any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() * b.element_size()
               for b in opt._shared.views.buffers)


@pytest.mark.parametrize("overlap", [True, False])
def test_distributed_optimizer_pushes_host_gradients_where_they_lie(make_cluster, overlap):
    """``DistributedOptimizer`` keeps a host model's parameters and gradients in shared memory (the
    gradients accumulated in place): every block with a gradient is read by its server where it lies,
    and its new values are written there (not answered through the server's shared values); the
    unused layer's gradient counts as none (Adam leaves it alone, as torch's with
    ``set_to_none``); the values equal torch's."""
    steps = 4
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    torch.manual_seed(0)
    model = models.OverlapNet()
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 overlap=overlap) as opt:
        pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
        for step in range(steps):
            opt.zero_grad()
            x, y = models.overlap_batch(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        # host gradients are accumulated where the servers read them (``FlatViews.in_place``)
        assert all(_in_views(opt, p.grad) for p in model.parameters())
        stats = opt.worker.server_stats()
        # a block holding the unused layer has a segment without a gradient: it takes the lane
        whole = [b for b in opt.worker.shard_map.blocks if not any(s.key.startswith("unused") for s in b.segments)]
        assert sum(s["direct_requests"] for s in stats) == steps * len(whole)
        assert sum(s["shared_answers"] for s in stats) == steps * (len(opt.worker.shard_map.blocks) - len(whole))
        assert all(p.data_ptr() == pointers[name] for name, p in model.named_parameters())  # values stay put
    want = _adam_reference(steps)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6)


def _small_stack() -> torch.nn.Module:
    """Tensors small enough that several share a block (``CHUNK``), and a large one cut in blocks."""
    return torch.nn.Sequential(torch.nn.Linear(8, 40), torch.nn.Tanh(), torch.nn.Linear(40, 4), torch.nn.Tanh(),
                               torch.nn.Linear(4, 1))


def _small_stack_and_torch_adam(steps: int, skipped: frozenset = frozenset()
                                ) -> tuple[torch.nn.Module, torch.nn.Module, list]:
    """``_small_stack`` (seeded), a copy of it trained by torch's Adam on ``steps`` batches but
    those ``skipped`` (by index), and the batches."""
    torch.manual_seed(0)
    model = _small_stack()
    reference = copy.deepcopy(model)
    local = torch.optim.Adam(reference.parameters(), lr=0.01)
    batches = [(torch.randn(16, 8), torch.randn(16, 1)) for _ in range(steps)]
    for x, y in (batch for step, batch in enumerate(batches) if step not in skipped):
        local.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        local.step()
    return model, reference, batches


def _spy_packing(monkeypatch) -> tuple[list, list]:
    """Lists that fill as exchanges go: each packed block sent through its lane (its id, whether
    the lane is on a GPU, whether its server reads it where it lies), and each tensor a
    ``PushPull`` added one by one (not the values registration sends)."""
    import psframework.worker.exchange as exchange_module
    through_lane, added = [], []
    packed_through_lane, plain_add = exchange_module._packed_through_lane, exchange_module.Exchange.add

    def spy_lane(exchange, lane, block, packed, regions):
        through_lane.append((block.block_id, lane.on_device, regions is not None))
        return packed_through_lane(exchange, lane, block, packed, regions)

    def spy_add(exchange, name, *args, **kwargs):
        if exchange.op is P.PushPull:
            added.append(name)
        return plain_add(exchange, name, *args, **kwargs)
    monkeypatch.setattr(exchange_module, "_packed_through_lane", spy_lane)
    monkeypatch.setattr(exchange_module.Exchange, "add", spy_add)
    return through_lane, added


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("mapped", [True, False])
def test_distributed_optimizer_sends_each_packed_block_as_one_piece(make_cluster, monkeypatch, mapped, overlap):
    """A block of several tensors whose gradients were all given goes as one region each way
    (``FlatViews.packed``), with none of its tensors added one by one: read and written where it
    lies, or, where the server cannot map the memory (a wrong token), copied through the lane in
    one piece each way; the values equal torch's either way. With overlap the block goes from the
    hook of its last tensor (``_Packing``)."""
    steps = 4
    through_lane, added = _spy_packing(monkeypatch)
    model, reference, batches = _small_stack_and_torch_adam(steps)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK // 4)
    if not mapped:
        from psframework.datapath.exports import SharedHostMemory
        real = SharedHostMemory.ipc_handle
        monkeypatch.setattr(SharedHostMemory, "ipc_handle", lambda memory, base: b"\0" * 16 + real(memory, base)[16:])
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 overlap=overlap) as opt:
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        blocks = opt.worker.shard_map.blocks
        stats = opt.worker.server_stats()
    packable = [block for block in blocks if len(block.segments) > 1]
    assert packable and len(packable) < len(blocks)
    assert sorted(through_lane) == sorted((block.block_id, False, mapped) for block in packable for _ in range(steps))
    packed_names = {seg.key for block in packable for seg in block.segments}
    assert added and not packed_names & set(added)  # the other tensors, one by one
    assert sum(s["direct_requests"] for s in stats) == (steps * len(blocks) if mapped else 0)
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach(), want.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_parameter_moved_off_its_view_leaves_its_block_to_the_tensor_by_tensor_way(make_cluster, overlap):
    """``p.data = ...`` on a host parameter of a packed block: the parameter no longer lies where
    the server writes the block's values, so that block goes tensor by tensor from then on, and
    every parameter, the moved one too, keeps training as torch's does."""
    model, reference, local, opt = _stack_beside_torch(make_cluster, overlap)
    with opt:
        for step in range(5):
            x, y = torch.randn(16, 8), torch.randn(16, 1)
            for net, optimizer in ((reference, local), (model, opt)):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(net(x), y).backward()
                optimizer.step()
            if step == 1:
                model[2].bias.data = model[2].bias.data.clone()  # "2.bias" shares a block with others
            _assert_same(model, reference)


def _stack_beside_torch(make_cluster, overlap: bool):
    """``_small_stack`` and a copy of it under torch's Adam, and a DistributedOptimizer over the
    first (two servers, blocks small enough that several of them pack several tensors)."""
    torch.manual_seed(0)
    model = _small_stack()
    reference = copy.deepcopy(model)
    local = torch.optim.Adam(reference.parameters(), lr=0.01)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK // 4)
    opt = ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler), overlap=overlap)
    return model, reference, local, opt


def _assert_same(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    for (name, mine), want in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=name)


def test_with_overlap_a_packed_block_with_a_tensor_backward_did_not_reach_goes_tensor_by_tensor(make_cluster):
    """With overlap, a packed block one of whose tensors gets no gradient in a step (a branch the
    forward did not take) never hears from that tensor's hook: ``step()`` sends the block tensor by
    tensor, that tensor pushed as "no gradient", and every parameter trains as torch's does (Adam
    leaves a parameter without a gradient alone)."""
    model, reference, local, opt = _stack_beside_torch(make_cluster, overlap=True)
    with opt:
        packed = [block for block in opt.worker.shard_map.blocks if len(block.segments) > 1]
        assert any(seg.key == "4.weight" for block in packed for seg in block.segments)
        for step in range(4):
            x, y = torch.randn(16, 8), torch.randn(16, 1)
            skip_last = step % 2 == 1  # the last layer's weight gets no gradient in these steps
            for net, optimizer in ((reference, local), (model, opt)):
                optimizer.zero_grad()
                hidden = net[:4](x)
                out = hidden.sum(dim=1, keepdim=True) + net[4].bias if skip_last else net[4](hidden)
                torch.nn.functional.mse_loss(out, y).backward()
                optimizer.step()
            _assert_same(model, reference)


def test_a_packed_block_is_given_once_and_its_tensors_only_with_it_until_unpacked(make_cluster):
    """``add_packed_block`` refuses a block given already; ``Exchange.add`` refuses a tensor of a
    block planned whole until ``unpack_block``, which lets the block go tensor by tensor."""
    from psframework.worker.exchange import add_packed_block, unpack_block
    model, _, _, opt = _stack_beside_torch(make_cluster, overlap=True)
    with opt:
        regions = opt._overlap._packing.regions()
        block = min(regions)
        name = sorted(regions[block].names)[0]
        for unpack in (False, True):
            exchange = opt.worker.exchange(P.PushPull, list(opt.params), opt.params, after_caller=False,
                                           packed=regions)
            try:
                with pytest.raises(ConfigError, match="goes with its block"):
                    exchange.add(name, torch.zeros_like(opt.params[name]))
                if unpack:
                    unpack_block(exchange, block, opt.params)
                    assert not add_packed_block(exchange, block)
                    exchange.add(name, torch.zeros_like(opt.params[name]))
                else:
                    assert add_packed_block(exchange, block)
                    with pytest.raises(ConfigError, match="given twice"):
                        add_packed_block(exchange, block)
            finally:
                exchange.abandon()


def test_with_overlap_a_step_whose_finish_failed_loses_no_tensor_of_a_block_begun(make_cluster, monkeypatch):
    """``step()`` fails while handing over the gradients no hook saw (their staging raised), in a
    step where backward reached part of a packed block: called again, ``step()`` hands over the
    block's tensors the hooks saw too and completes (never waits for ever for them), and the
    servers hold torch's values after that step: every gradient applied once. The failed step
    moved the parameters away from where that exchange's answers write; the model gets the
    values all the same when the step called again returns, before the next forward, also those
    of tensors its hooks handed over before the failure and sent only after the move."""
    import threading

    from psframework.worker.exchange import Exchange
    sent_after_the_move, armed = threading.Event(), threading.Event()
    send_ready, held = Exchange.send_ready, []

    def held_back(exchange, *args, **kwargs):  # the communication thread, behind a busy host
        if armed.is_set() and not sent_after_the_move.is_set():
            held.append(sent_after_the_move.wait(timeout=10))
        return send_ready(exchange, *args, **kwargs)
    monkeypatch.setattr(Exchange, "send_ready", held_back)
    model, reference, local, opt = _stack_beside_torch(make_cluster, overlap=True)
    with opt:
        for net, optimizer in ((reference, local), (model, opt)):  # the second step leaves 4.weight out
            for skip_last in (False, True):
                x, y = torch.randn(16, 8, generator=torch.Generator().manual_seed(int(skip_last))), torch.ones(16, 1)
                optimizer.zero_grad()
                if net is model and skip_last:
                    armed.set()
                hidden = net[:4](x)
                out = hidden.sum(dim=1, keepdim=True) + net[4].bias if skip_last else net[4](hidden)
                torch.nn.functional.mse_loss(out, y).backward()
                if net is reference or not skip_last:
                    optimizer.step()
        real = opt._overlap._grads_of

        def failing(names):
            opt._overlap._grads_of = real
            raise RuntimeError("no memory to stage the gradients")
        opt._overlap._grads_of = failing
        with pytest.raises(RuntimeError, match="no memory to stage"):
            opt.step()
        assert opt._moved_mid_step  # their values are read back once the step called again is done
        sent_after_the_move.set()
        again = threading.Thread(target=opt.step, daemon=True)
        again.start()
        again.join(timeout=30)
        assert not again.is_alive(), "step() waits for tensors of a block that its failed step lost"
        assert not opt._moved_mid_step
        assert held and all(held)  # sends were held back, each until the move (none timed out)
        on_servers = {name: torch.empty_like(p) for name, p in opt.params.items()}
        opt.worker.pull(on_servers).wait(timeout=30)
        for (name, mine), want in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(on_servers[name], want.detach(), rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(mine.detach(), want.detach(), rtol=1e-5, atol=1e-6, msg=name)


class _InterruptedOnce:
    """Overlap's queue of results, whose first ``get`` raises KeyboardInterrupt (Ctrl-C while
    ``step()`` waits for the communication thread)."""

    def __init__(self, results):
        self._results, self.interrupted = results, False

    def get(self, *args, **kwargs):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return self._results.get(*args, **kwargs)

    def put(self, item) -> None:
        self._results.put(item)


def test_with_overlap_a_step_interrupted_while_waiting_hands_its_result_to_no_later_step(make_cluster, monkeypatch):
    """Ctrl-C while ``step()`` waits for the communication thread: the interrupted step's result,
    which the thread gives after, is not taken for the next step's. The next ``step()`` returns
    only once its own exchange is done, with the servers' values in the model, and so do the
    steps after it."""
    import threading

    from psframework.training import _Overlap
    release, finish, finished = threading.Event(), _Overlap._finish, []

    def held_back(overlap, *args, **kwargs):  # the second step's exchange, behind a slow server
        finished.append(None)
        if len(finished) == 2:
            assert release.wait(timeout=10)
        return finish(overlap, *args, **kwargs)
    monkeypatch.setattr(_Overlap, "_finish", held_back)
    model, _, _, opt = _stack_beside_torch(make_cluster, overlap=True)
    with opt:
        opt._overlap._done = _InterruptedOnce(opt._overlap._done)

        def backward(seed: int) -> None:
            x = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), torch.ones(16, 1)).backward()
        backward(0)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
        backward(1)
        step = threading.Thread(target=opt.step, daemon=True)
        step.start()
        step.join(timeout=1.0)
        returned_before_its_exchange = not step.is_alive()
        release.set()
        step.join(timeout=30)
        assert not step.is_alive()
        assert not returned_before_its_exchange, "step() took the interrupted step's result for its own"
        for seed in (2, 3):
            backward(seed)
            opt.step()
            on_servers = {name: torch.empty_like(p) for name, p in opt.params.items()}
            opt.worker.pull(on_servers).wait(timeout=30)
            for name, mine in model.named_parameters():
                torch.testing.assert_close(mine.detach(), on_servers[name], rtol=0, atol=0, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [True, False])
def test_gpu_distributed_optimizer_exchanges_packed_blocks_where_they_lie(make_cluster, monkeypatch, overlap):
    """With ``PS_DIRECT_GPU=1`` ``DistributedOptimizer`` lays a GPU model's parameters and gradients
    out block by block: every block, those packing several small tensors too, is read and written
    by its server where it lies, and the values equal torch's Adam. With overlap a packed block
    goes whole from its last tensor's hook, after an event recorded behind its staging."""
    from tests.integration.test_cuda_ipc import GPU_VS_CPU
    monkeypatch.setenv("PS_DIRECT_GPU", "1")
    _, added = _spy_packing(monkeypatch)
    steps = 4
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    reference = copy.deepcopy(model)
    local = torch.optim.Adam(reference.parameters(), lr=0.01)
    x, y = torch.randn(32, 64), torch.randn(32, 1)
    for _ in range(steps):
        local.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        local.step()
    model.cuda()
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 overlap=overlap) as opt:
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
            opt.step()
        blocks = opt.worker.shard_map.blocks
        packed_names = {seg.key for block in blocks if len(block.segments) > 1 for seg in block.segments}
        assert packed_names and not packed_names & set(added)  # none of a packed block's tensors one by one
        assert sum(s["direct_requests"] for s in opt.worker.server_stats()) == steps * len(blocks)
        # GPU gradients stay torch's, and the step copies them where the servers read them
        # (``FlatViews.stage``), with no hook of ours on a parameter without overlap
        assert not any(_in_views(opt, p.grad) for p in model.parameters())
        assert overlap or not any(p._post_accumulate_grad_hooks for p in model.parameters())
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach().cpu(), want.detach(), **GPU_VS_CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("server_device", ["cuda", "cpu"])
@pytest.mark.parametrize("overlap", [None, True])
def test_gpu_packed_blocks_go_through_their_lanes_in_one_piece(make_cluster, monkeypatch, server_device, overlap):
    """Without the direct exchange on the GPU (``PS_DIRECT_GPU=0``) a GPU model is laid out block
    by block all the same: a block of several tensors goes through its lane (a device lane to a
    GPU server, a host lane to a CPU server) in one copy each way, none of its tensors added one
    by one; with overlap from its last tensor's hook. The values equal torch's Adam."""
    from tests.integration.test_cuda_ipc import GPU_VS_CPU
    monkeypatch.setenv("PS_DIRECT_GPU", "0")
    steps = 3
    through_lane, added = _spy_packing(monkeypatch)
    model, reference, batches = _small_stack_and_torch_adam(steps)
    model.cuda()
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK // 4,
                           server_device=server_device)
    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 overlap=overlap) as opt:
        for x, y in batches:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
            opt.step()
        blocks = opt.worker.shard_map.blocks
        stats = opt.worker.server_stats()
        laid_out = set(opt._shared.views.names)
    packable = [block for block in blocks if len(block.segments) > 1]
    assert packable and len(packable) < len(blocks)
    packed_names = {seg.key for block in packable for seg in block.segments}
    assert laid_out == packed_names  # a large tensor's blocks are regions of it already
    on_device = server_device == "cuda"
    assert sorted(through_lane) == sorted((block.block_id, on_device, False) for block in packable for _ in range(steps))
    assert added and not packed_names & set(added)
    assert sum(s["direct_requests"] for s in stats) == 0
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach().cpu(), want.detach(), **GPU_VS_CPU)


@pytest.mark.gpu
@pytest.mark.parametrize("server_device", ["cuda", "cpu"])
def test_a_failed_step_of_a_gpu_model_laid_out_for_its_lanes_moves_it_and_keeps_no_spare(
        make_cluster, monkeypatch, server_device):
    """Overlap off, ``PS_DIRECT_GPU=0``: a step fails before it sends anything; the laid-out GPU
    tensors move to new buffers with their values, and once a later step completed the old ones go
    back to torch's allocator (no server maps them, so none is kept as a spare). Training goes on
    through the lanes in one piece per block, with torch's Adam's values for the steps that completed."""
    from psframework.training import _MappedParams
    from tests.integration.test_cuda_ipc import GPU_VS_CPU
    monkeypatch.setenv("PS_DIRECT_GPU", "0")
    through_lane, _ = _spy_packing(monkeypatch)
    failing = 1
    model, reference, batches = _small_stack_and_torch_adam(4, skipped=frozenset({failing}))
    model.cuda()
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK // 4,
                           server_device=server_device)
    stage = _MappedParams.stage

    def failing_stage(self, grads):
        raise RuntimeError("injected failure")

    with ps.DistributedOptimizer(model, ps.optim.Adam(lr=0.01), ps.init(scheduler=cluster.scheduler),
                                 overlap=False) as opt:
        mapped = opt._shared
        for step, (x, y) in enumerate(batches):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x.cuda()), y.cuda()).backward()
            if step != failing:
                opt.step()
                continue
            before = {name: (p.data_ptr(), p.detach().clone()) for name, p in mapped.views.params.items()}
            monkeypatch.setattr(_MappedParams, "stage", failing_stage)
            with pytest.raises(RuntimeError, match="injected failure"):
                opt.step()
            monkeypatch.setattr(_MappedParams, "stage", stage)
            assert opt._shared is mapped and mapped._retired
            for name, p in mapped.views.params.items():
                assert p.data_ptr() != before[name][0] and torch.equal(p, before[name][1]), name
        assert not mapped._retired and not mapped._buffers._spare  # given back to torch's allocator
        packed = [block for block in opt.worker.shard_map.blocks if len(block.segments) > 1]
    assert sorted(through_lane) == sorted((block.block_id, server_device == "cuda", False)
                                          for block in packed for _ in range(len(batches) - 1))
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach().cpu(), want.detach(), **GPU_VS_CPU)


def _async_sgd_optimizer(make_cluster, overlap: bool = False) -> tuple[torch.nn.Module, ps.DistributedOptimizer]:
    """The test model and its ``DistributedOptimizer`` (SGD) with two async CPU servers."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async", chunk_bytes=CHUNK)
    torch.manual_seed(0)
    model = models.OverlapNet()
    return model, ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), ps.init(scheduler=cluster.scheduler),
                                          overlap=overlap)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_failed_step_leaves_its_gradients_to_the_servers_and_trains_on(make_cluster, monkeypatch, overlap):
    """A step fails after some blocks were pushed: the gradients move to new buffers with their
    values, the old buffers keep what was pushed while the caller zeroes the new ones, the next
    steps go direct again, and the old buffers, let go at once, are unmapped by the servers."""
    from psframework.worker.exchange import Exchange
    clusters = []
    model, opt = _async_sgd_optimizer(lambda **kwargs: clusters.append(make_cluster(**kwargs)) or clusters[-1],
                                      overlap)
    servers = [p.pid for name, p in clusters[0].processes().items() if name.startswith("server")]
    with opt:
        memory = opt.worker.lanes.direct.host_memory
        old = {f"/memfd:psf-{os.getpid()}-export-{memory.allocation_of(buffer.data_ptr())[2]}"
               for buffer in opt._shared.views.buffers}
        assert all(old & _mapped_exports(pid) for pid in servers)  # mapped from the start, before any step
        add = Exchange.add

        def failing_add(self, name, tensor, after=None, checked=False):
            if name == "last.bias":
                raise RuntimeError("injected failure")
            return add(self, name, tensor, after, checked)

        x, y = models.overlap_batch(0)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        monkeypatch.setattr(Exchange, "add", failing_add)  # with overlap, adds start in backward
        torch.nn.functional.mse_loss(model(x), y).backward()
        pushed = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        kept = {name: g.clone() for name, g in pushed.items()}
        with pytest.raises(RuntimeError, match="injected failure"):
            opt.step()
        monkeypatch.setattr(Exchange, "add", add)
        assert not opt._moved_mid_step  # that exchange was abandoned: the next step is a new one
        for name, p in model.named_parameters():
            if name in pushed:
                assert p.grad.data_ptr() != pushed[name].data_ptr() and torch.equal(p.grad, kept[name]), name
        opt.zero_grad()
        assert all(torch.equal(pushed[name], kept[name]) for name in pushed)  # the old buffers as pushed
        before = sum(s["direct_requests"] for s in opt.worker.server_stats())
        for _ in range(2):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        stats = opt.worker.server_stats()
        assert sum(s["direct_requests"] for s in stats) > before
        assert not any(old & _mapped_exports(pid) for pid in servers)  # the failed step's buffers unmapped


def test_with_no_memory_for_new_buffers_a_failed_step_leaves_the_old_to_the_servers_and_trains_through_the_lanes(
        make_cluster, monkeypatch):
    """A step fails and there is no shared memory left to move the parameters to: they become
    ordinary tensors with their values, the old buffers are left to the servers (a late answer may
    still write them), and training goes on through the lanes with torch's numbers."""
    from psframework.training import _MappedBuffers
    from psframework.worker.exchange import Exchange
    model, opt = _async_sgd_optimizer(make_cluster)
    with opt:
        mapped = opt._shared
        old = mapped.views.buffers
        add = Exchange.add

        def failing_add(self, name, tensor, after=None, checked=False):
            raise RuntimeError("injected failure")

        def no_memory(self, numel, dtype, device):
            raise OSError("no space left on the shared memory file system")

        x, y = models.overlap_batch(0)
        torch.nn.functional.mse_loss(model(x), y).backward()
        values = {name: p.detach().clone() for name, p in model.named_parameters()}
        monkeypatch.setattr(Exchange, "add", failing_add)
        monkeypatch.setattr(_MappedBuffers, "__call__", no_memory)
        with pytest.raises(RuntimeError, match="injected failure"):
            opt.step()
        monkeypatch.setattr(Exchange, "add", add)
        assert opt._shared is None and opt._given_up == [mapped]
        for name, p in model.named_parameters():
            assert torch.equal(p, values[name]), name
        for buffer in old:
            buffer.fill_(5.0)  # a late answer
        assert all(torch.equal(p, values[name]) for name, p in model.named_parameters())
        before = sum(s["direct_requests"] for s in opt.worker.server_stats())
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        opt.step()
        assert sum(s["direct_requests"] for s in opt.worker.server_stats()) == before
    for name, p in model.named_parameters():
        if name in grads:
            torch.testing.assert_close(p, values[name] - 0.1 * grads[name])


def test_zeroed_and_hand_made_gradients_count_as_torch_counts_them(make_cluster):
    """``zero_grad(set_to_none=False)`` keeps the gradients that were there, zeroed, and a layer
    that never had one without (as torch's); a gradient the caller assigns is pushed though no
    hook saw it. The values equal torch's SGD with weight decay, which moves whatever has a gradient."""
    def train(model, opt, zero_grad):
        for step in range(2):
            zero_grad(set_to_none=step != 0)
            x, y = models.overlap_batch(step)
            torch.nn.functional.mse_loss(model(x), y).backward()
            if step == 1:
                model.unused.weight.grad = torch.ones_like(model.unused.weight)
            opt.step()
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    torch.manual_seed(0)
    reference = models.OverlapNet()
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, weight_decay=0.1)
    want = train(reference, opt, opt.zero_grad)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    torch.manual_seed(0)
    model = models.OverlapNet()
    with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1, weight_decay=0.1), ps.init(scheduler=cluster.scheduler),
                                 overlap=False) as opt:
        got = train(model, opt, opt.zero_grad)
        assert sum(s["direct_requests"] for s in opt.worker.server_stats()) > 0
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6)


def test_gradients_accumulated_over_two_backward_passes_are_staged_whole(make_cluster):
    """``zero_grad(set_to_none=False)`` and two backward passes a step: torch accumulates into the
    caller's gradients, the step copies the sums where the servers read them, and the values
    equal torch's SGD on the same sums."""
    model, opt = _async_sgd_optimizer(make_cluster)
    reference = copy.deepcopy(model)
    local = torch.optim.SGD(reference.parameters(), lr=0.1)
    with opt:
        for step in range(3):
            for net, optimizer in ((model, opt), (reference, local)):
                optimizer.zero_grad(set_to_none=False)
                for half in range(2):
                    x, y = models.overlap_batch(2 * step + half)
                    torch.nn.functional.mse_loss(net(x), y).backward()
                optimizer.step()
        assert sum(s["direct_requests"] for s in opt.worker.server_stats()) > 0
    for mine, want in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.detach(), want.detach(), rtol=1e-5, atol=1e-6)
