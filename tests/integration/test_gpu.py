"""Shards on GPUs, worker tensors on GPUs, and the overlap of communication with backward.

Tests marked ``gpu`` (``multigpu``: two GPUs) are skipped where torch sees none; the overlap tests
without a mark run everywhere, so CI covers the hook logic on CPU.
"""

from __future__ import annotations

import msgpack
import pytest
import torch

import psframework as ps

from tests.integration import models
from tests.integration.test_core import CHUNK, _raw_client, assert_one_step_of_ones, assert_params_equal
from tests.threads import run_in_threads as _run_threads

gpu = pytest.mark.gpu
BIG_CHUNK = 1 << 18  # frames of 256 KiB: above the size that ZeroMQ sends zero-copy, so sends are tracked
GPU_VS_CPU = {"rtol": 1e-4, "atol": 1e-5}  # float32 on the GPU against float32 on the CPU: rounding apart


# ---------------------------------------------------------------------------------------- shards on a GPU


@gpu
@pytest.mark.parametrize("optimizer,servers,workers", [("sgd", 2, 2), ("adam", 3, 2)])
def test_sync_with_shards_on_gpu_equals_single_process_training(make_cluster, worker_procs, optimizer,
                                                                  servers, workers):
    steps = 5
    cluster = make_cluster(num_servers=servers, num_workers=workers, mode="sync", chunk_bytes=CHUNK,
                           server_device="cuda")
    results = worker_procs(cluster, "sync_train", workers, optimizer=optimizer, steps=steps).join()
    want = models.reference(optimizer, steps)
    for got in results:
        assert_params_equal(got, want, **GPU_VS_CPU)  # the fused update on the GPU against torch on the CPU
    assert not torch.allclose(want["W"], models.make_params(0)["W"])


@gpu
@pytest.mark.parametrize("server_device,optimizer", [("cuda", "adam"), ("cpu", "sgd")])
def test_sync_with_worker_tensors_on_gpu_equals_single_process_training(make_cluster, worker_procs,
                                                                         server_device, optimizer):
    steps = 5
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK,
                           server_device=server_device)
    results = worker_procs(cluster, "sync_train", 2, optimizer=optimizer, steps=steps, device="cuda").join()
    want = models.reference(optimizer, steps)
    for got in results:
        assert_params_equal(got, want, **GPU_VS_CPU)


@gpu
@pytest.mark.parametrize("server_device", ["cuda", "cpu"])
def test_pull_and_push_pull_land_in_gpu_tensors(make_cluster, server_device):
    """Every kind of destination on a GPU (contiguous, a transposed view, bf16) gets exact values,
    many times over the same reused pinned buffers, with pushes queued back to back."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async", chunk_bytes=BIG_CHUNK,
                           server_device=server_device)
    with ps.init(scheduler=cluster.scheduler) as worker:
        dev = torch.device("cuda")
        params = {"big": torch.zeros(300000, device=dev), "mat": torch.zeros(30, 40, device=dev),
                  "half": torch.zeros(700, device=dev, dtype=torch.bfloat16)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        host = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in params.items()}
        futures = []
        for k in range(1, 21):
            # integer values: the sums are exact in float32 and bf16 (|sum| < 256)
            grads = {n: torch.full_like(t, float(k % 7 - 3)) for n, t in params.items()}
            for n, g in grads.items():
                host[n] -= g.cpu()
            futures.append(worker.push(grads))  # not waited: the next push reuses the staging buffers
        for f in futures:
            f.wait(timeout=30)
        transposed = torch.full((40, 30), -1.0, device=dev).t()  # non-contiguous destination
        worker.pull({"big": params["big"], "mat": transposed, "half": params["half"]}).wait(timeout=30)
        assert torch.equal(params["big"].cpu(), host["big"])
        assert torch.equal(transposed.cpu(), host["mat"])
        assert torch.equal(params["half"].cpu(), host["half"])
        for step in range(5):  # push_pull into the tensors the gradients were computed for
            grads = {n: torch.full_like(t, float(step + 1)) for n, t in params.items()}
            for n, g in grads.items():
                host[n] -= g.cpu()
            worker.push_pull(grads, into=params).wait(timeout=30)
            for n in params:
                assert torch.equal(params[n].cpu(), host[n]), n
        assert all(s["device"].startswith(server_device) for s in worker.server_stats())


@gpu
def test_async_pushes_from_gpu_workers_are_each_applied_once_on_gpu_shards(make_cluster):
    """Three workers push to the same GPU blocks without waiting: the receive ring and the reply
    buffers are reused while copies and sends may still be in flight."""
    workers, pushes = 3, 20
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="async", chunk_bytes=BIG_CHUNK,
                           server_device="cuda")

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"big": torch.zeros(300000, device="cuda"), "small": torch.zeros((), device="cuda")}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            futures = []
            for k in range(pushes):
                value = float(worker.rank * 100 + k + 1)  # integers: float32 sums stay exact
                futures.append(worker.push({n: torch.full_like(t, value) for n, t in params.items()}))
                if k % 5 == 0:
                    worker.pull(params).wait(timeout=30)  # replies interleaved with the pushes
            for f in futures:
                f.wait(timeout=30)
            worker.barrier()
            worker.pull(params).wait(timeout=30)
            worker.barrier()
            return {n: t.cpu() for n, t in params.items()}

    expected = -sum(r * 100 + k + 1 for r in range(workers) for k in range(pushes))
    for params in _run_threads(workers, work):
        assert torch.equal(params["big"], torch.full((300000,), float(expected)))
        assert params["small"].item() == expected


def _whole_and_partial_pushes(make_cluster, server_device: str) -> list[dict]:
    """Two sync steps on one block of three tensors: in the first, worker 0 pushes the whole block
    before worker 1 pushes part of it; in the second, the other way round."""
    cluster = make_cluster(num_servers=1, num_workers=2, chunk_bytes=1 << 20, server_device=server_device)

    def work(rank):
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"a": torch.zeros(10), "b": torch.zeros(20), "c": torch.zeros(5)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0, momentum=0.5))
            assert len(worker.shard_map.blocks) == 1
            for step in range(2):
                whole_first = step == 0
                names = list(params) if (rank == 0) == whole_first else ["a", "c"]
                for turn in range(2):  # the whole push goes first in step 0, the partial one in step 1
                    if turn == rank:
                        grads = {n: torch.arange(params[n].numel(), dtype=torch.float32) * (rank + 1) + step
                                 for n in names}
                        worker.push(grads).wait(timeout=30)
                    worker.barrier()
                worker.pull(params).wait(timeout=30)
            worker.barrier()
            return params

    return _run_threads(2, work)


@pytest.mark.parametrize("shm", ["1", "0"])
@gpu
def test_whole_and_partial_pushes_of_a_block_on_gpu_shards_equal_host_shards(make_cluster, monkeypatch, shm):
    """A GPU server moves and sums a whole block's push as one flat tensor, and a partial one
    segment by segment; mixed in one step, both orders give what a host-memory server gives."""
    monkeypatch.setenv("PS_SHM", shm)
    on_gpu = _whole_and_partial_pushes(make_cluster, "cuda")
    on_host = _whole_and_partial_pushes(make_cluster, "cpu")
    for got, expected in zip(on_gpu, on_host):
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], **GPU_VS_CPU)
    assert on_host[0]["a"].abs().sum() > 0 and on_host[0]["b"].abs().sum() > 0


@gpu
def test_a_gpu_server_applies_the_blocks_of_an_exchange_together_without_waiting_at_its_end(make_cluster):
    """A GPU server holds back complete sync blocks while the worker says more of its pushes
    follow, and applies them in few optimizer steps; the exchange's last push lets them all go,
    so pushing a part of the model never waits for blocks that will not come."""
    cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=BIG_CHUNK, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {name: torch.zeros(200000) for name in ("a", "b", "c")}  # 4 blocks each
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for step in range(3):
            worker.push_pull({"a": torch.ones(200000)}, into={"a": params["a"]}).wait(timeout=30)
            assert torch.equal(params["a"], torch.full((200000,), -float(step + 1)))
        stats = worker.server_stats()[0]
    assert stats["applied"] == 3 * 4
    assert 3 <= stats["apply_bursts"] < stats["applied"]
    # Had the exchange's last push not let the held blocks go, every step's would have waited out the
    # timer; a stray timed burst or two is a busy host pausing the worker for 5 ms between two pushes.
    assert stats["timed_applies"] < 3


@gpu
def test_gpu_server_rejects_bad_frames_and_keeps_serving(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=CHUNK, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {k: v.cuda() for k, v in models.make_params(0).items()}
        worker.register(params, optimizer=ps.optim.SGD(lr=0.1))
        block = worker.shard_map.blocks_of_server(0)[0]
        sock = _raw_client(worker.membership.servers[0], worker)
        try:
            header = {"op": "push", "req": 7, "block": block.block_id, "rank": 0, "dtype": block.dtype,
                      "segs": None}
            sock.send_multipart([msgpack.packb(header)] + [b"\0" * 3 for _ in block.segments])
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["kind"] == "bad_request" and "expected" in reply["message"]
        finally:
            sock.close()
        assert_one_step_of_ones(worker, params, lr=0.1)


@gpu
def test_adam_on_a_gpu_server(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(1000)}
        worker.register(params, optimizer=ps.optim.Adam(lr=0.1))
        worker.push_pull({"w": torch.ones(1000)}, into=params).wait(timeout=30)
        torch.testing.assert_close(params["w"], torch.full((1000,), -0.1))  # Adam's first step: lr * sign
        assert worker.server_stats()[0]["device"].startswith("cuda")


@pytest.mark.multigpu
def test_servers_of_one_host_spread_over_its_gpus(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(10)}, optimizer=ps.optim.SGD(lr=1.0))
        assert [s["device"] for s in worker.server_stats()] == ["cuda:0", "cuda:1"]


@pytest.mark.multigpu
def test_an_explicit_gpu_wins_over_spreading(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, server_device="cuda:1")
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(10)}, optimizer=ps.optim.SGD(lr=1.0))
        assert [s["device"] for s in worker.server_stats()] == ["cuda:1", "cuda:1"]


# ---------------------------------------------------------------------------------------- overlap


def _overlap_runs(make_cluster, worker_procs, device: str, server_device: str, steps: int = 4):
    runs = {}
    for overlap in (False, True):
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK,
                               server_device=server_device)
        runs[overlap] = worker_procs(cluster, "overlap_train", 2, steps=steps, overlap=overlap, device=device,
                                     slow_backward=0.3 if overlap else 0.0).join(timeout=120)
        cluster.stop()
    return runs


def _check_overlap_equals_plain(runs, exact: dict, reference: dict, steps: int = 4) -> None:
    want = models.overlap_reference(steps)
    plain, overlapped = runs[False], runs[True]
    for rank in range(2):
        # the same gradients reach the same servers in the same blocks
        assert_params_equal(overlapped[rank]["params"], plain[rank]["params"], **exact)
        assert_params_equal(overlapped[rank]["params"], want, **reference)
        # blocks of the later layers went out while the first layer's backward was still sleeping
        assert overlapped[rank]["early_blocks"] > 0
        assert plain[rank]["early_blocks"] == 0


def test_overlap_equals_plain_on_cpu(make_cluster, worker_procs):
    runs = _overlap_runs(make_cluster, worker_procs, device="cpu", server_device="cpu")
    _check_overlap_equals_plain(runs, exact={"rtol": 0, "atol": 0}, reference={"rtol": 1e-5, "atol": 1e-6})


@gpu
def test_overlap_equals_plain_on_gpu(make_cluster, worker_procs):
    runs = _overlap_runs(make_cluster, worker_procs, device="cuda", server_device="cuda")
    _check_overlap_equals_plain(runs, exact={"rtol": 1e-6, "atol": 1e-7}, reference=GPU_VS_CPU)


@gpu
def test_a_gpu_model_whose_blocks_all_go_through_device_lanes_steps_without_overlap_by_default(make_cluster):
    """Where every block goes through a device lane the step is ordered on the GPU, and overlap's
    thread only takes host time from the training loop: off by default there, so two backward
    passes may feed one step; a GPU model with a host server keeps overlap."""
    for server_device, overlaps in (("cuda", False), ("cpu", True)):
        cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=CHUNK, server_device=server_device)
        with ps.init(scheduler=cluster.scheduler) as worker:
            model = models.OverlapNet().cuda()
            with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker=worker) as opt:
                assert (opt._overlap is not None) == overlaps
                x, y = (t.cuda() for t in models.overlap_batch(0))
                for _ in range(1 if overlaps else 2):
                    torch.nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                assert opt.step_count == 1


def test_overlap_refuses_a_second_backward_before_step(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        model = models.OverlapNet()
        with ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), worker=worker) as opt:
            x, y = models.overlap_batch(0)
            torch.nn.functional.mse_loss(model(x), y).backward()
            first = {k: p.grad.clone() for k, p in opt.params.items() if p.grad is not None}
            with pytest.raises(ps.ConfigError, match="overlap=False"):
                torch.nn.functional.mse_loss(model(x), y).backward()
            # refused before anything was accumulated: the first backward's gradients make the step
            assert all(torch.equal(opt.params[k].grad, g) for k, g in first.items())
            opt.step()
            before = {k: v.clone() for k, v in opt.params.items()}
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            assert not torch.equal(before["mid.weight"], opt.params["mid.weight"])
