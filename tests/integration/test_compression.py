"""Compressed pushes and rounded pulls with real servers: training equals a single process that
applies the same codec to the same gradients, and the bytes on the wire match each codec's formula."""

from __future__ import annotations

import math

import pytest
import torch

import psframework as ps
from psframework import protocol as P
from psframework.compress import ErrorFeedback, payload_bytes
from psframework.worker.requests import Future, Request
from tests.integration import models

CHUNK = 4096  # W (10 KiB) is cut into segments of 1024 values on both servers
ALL_ON_THE_WIRE = {"PS_SHM": "0", "PS_COMPRESS_MIN_BYTES": "0"}  # every tensor compressed, none through lanes
CODECS = ["ps.compress.FP16()", "ps.compress.BF16()", "ps.compress.Int8(block=100)", "ps.compress.OneBit(block=100)",
          "ps.compress.TopK(0.05)", "ps.compress.RandomK(0.05, seed=3)"]


def reference(codec: str, steps: int, workers: int, segments: dict, pull: str = "None",
              optimizer: str = "sgd") -> dict[str, torch.Tensor]:
    """What the servers hold after ``steps`` sync steps: each worker's gradients go through its own
    codec and residuals segment by segment, their sum is scaled by 1/workers, then torch.optim with
    the kernels the servers use (fused, where torch has them for the CPU): a lossy codec turns a
    last-bit difference between two kernels into a difference of its own rounding step."""
    params = {k: v.clone() for k, v in models.make_params(0).items()}
    opt = models.optimizer_spec(optimizer).build(list(params.values()))
    codecs = [eval(codec, {"ps": ps}) for _ in range(workers)]  # each worker has its own (RandomK's generator)
    feedback = [{name: ErrorFeedback(c) for name in params} for c in codecs]
    rounded = eval(pull, {"ps": ps})
    per = models.BATCH // workers
    for step in range(steps):
        x, y = models.batch(step)
        seen = {k: v if rounded is None else _rounded(rounded, v, segments[k]) for k, v in params.items()}
        total: dict[str, torch.Tensor] = {}
        for rank in range(workers):
            leaves = {k: v.clone().requires_grad_(True) for k, v in seen.items()}
            models.loss_fn(leaves, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]).backward()
            for name, leaf in leaves.items():
                decoded = _through(feedback[rank][name], name, leaf.grad.view(-1), segments[name])
                total[name] = decoded if name not in total else total[name] + decoded
        for name, p in params.items():
            p.grad = (total[name] * (1.0 / workers)).view(p.shape)
        opt.step()
    return params


def _rounded(codec, values: torch.Tensor, segments: list) -> torch.Tensor:
    """``values`` as a pull rounded with ``codec`` brings them: each segment encoded on its own."""
    flat = values.reshape(-1)
    return torch.cat([codec.decode(codec.encode(flat[offset:offset + n]), n)
                      for offset, n in segments]).view(values.shape)


def _through(feedback: ErrorFeedback, name: str, grad: torch.Tensor, segments: list) -> torch.Tensor:
    if feedback.codec is None:
        return grad
    return torch.cat([feedback.codec.decode(feedback.encode(offset, grad[offset:offset + n], name), n)
                      for offset, n in segments])


def _assert_same(got: dict, want: dict) -> None:
    for name in want:
        # the same float32 operations in the same order: equal but for a last bit here and there
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("codec", CODECS)
def test_sync_training_with_a_codec_equals_one_process_with_the_same_codec(make_cluster, worker_procs, codec):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "compressed_train", 2, env=ALL_ON_THE_WIRE, codec=codec, steps=5).join()
    want = reference(codec, 5, 2, results[0]["segments"])
    assert len(results[0]["segments"]["W"]) > 1  # W is cut into segments, each with its own blocks of scales
    for got in results:
        _assert_same(got["params"], want)
    assert not torch.allclose(want["W"], models.make_params(0)["W"])
    exact = reference("None", 5, 2, results[0]["segments"])
    assert not torch.equal(want["W"], exact["W"])  # the codec did change what was trained


@pytest.mark.parametrize("codec", ["ps.compress.TopK(0.05)", "ps.compress.Int8(block=100)"])
def test_with_overlap_the_same(make_cluster, worker_procs, codec):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "compressed_train", 2, env=ALL_ON_THE_WIRE, codec=codec, steps=4,
                           overlap=True).join()
    want = reference(codec, 4, 2, results[0]["segments"])
    for got in results:
        _assert_same(got["params"], want)


@pytest.mark.parametrize("pull", ["ps.compress.FP16()", "ps.compress.Int8(block=100)"])
def test_rounded_pulls_train_on_rounded_copies_while_servers_keep_full_precision(make_cluster, worker_procs, pull):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK)
    results = worker_procs(cluster, "compressed_train", 2, env=ALL_ON_THE_WIRE, codec="None", steps=4,
                           pull=pull).join()
    segments, codec = results[0]["segments"], eval(pull, {"ps": ps})
    servers = reference("None", 4, 2, segments, pull=pull)
    rounded = {k: _rounded(codec, v, segments[k]) for k, v in servers.items()}
    for got in results:
        # the workers hold the rounding of the servers' full-precision values, segment by segment
        _assert_same(got["params"], rounded)
    assert not torch.equal(servers["W"], rounded["W"])


def test_async_with_a_codec_equals_one_process(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async", chunk_bytes=CHUNK)
    codec = "ps.compress.OneBit(block=100)"
    results = worker_procs(cluster, "compressed_train", 1, env=ALL_ON_THE_WIRE, codec=codec, steps=4).join()
    _assert_same(results[0]["params"], reference(codec, 4, 1, results[0]["segments"]))


def test_ssp_with_a_codec_trains(make_cluster, worker_procs):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="ssp", staleness=1, chunk_bytes=CHUNK)
    results = worker_procs(cluster, "compressed_train", 2, env=ALL_ON_THE_WIRE, codec="ps.compress.TopK(0.1)",
                           steps=4).join()
    for got in results:
        assert all(torch.isfinite(v).all() for v in got["params"].values())
        assert not torch.equal(got["params"]["W"], models.make_params(0)["W"])


@pytest.mark.gpu
@pytest.mark.parametrize("overlap", [False, True])
def test_on_gpus_the_same(make_cluster, worker_procs, overlap):
    """Encoded on the workers' GPU, decoded on the servers' GPU, rounded pulls encoded there."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=CHUNK, server_device="cuda")
    codec, pull = "ps.compress.Int8(block=100)", "ps.compress.BF16()"
    results = worker_procs(cluster, "compressed_train", 2, env=ALL_ON_THE_WIRE, codec=codec, steps=4, pull=pull,
                           overlap=overlap, device="cuda").join()
    want = reference(codec, 4, 2, results[0]["segments"], pull=pull)
    for got in results:  # GPU kernels round otherwise than the CPU's: an int8 step may differ here and there
        for name in want:
            rounded = want[name].bfloat16().float()
            torch.testing.assert_close(got["params"][name], rounded, rtol=2e-2, atol=2e-3)


# ------------------------------------------------------------------------------------ bytes on the wire


@pytest.fixture
def one_worker(make_cluster, monkeypatch):
    def start(env: dict, **register):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        cluster = make_cluster(num_servers=2, num_workers=1, mode="async", chunk_bytes=1 << 16)
        worker = ps.init(scheduler=cluster.scheduler)
        params = {"big": torch.zeros(40000), "odd": torch.zeros(17003), "small": torch.zeros(10)}
        if register:
            worker.register(params, optimizer=ps.optim.SGD(lr=0.1), **register)
        return worker, params

    workers = []
    yield lambda env, **register: workers.append(start(env, **register)) or workers[-1]
    for worker, _ in workers:
        worker.close()


def _push_bytes(worker) -> int:
    return sum(s["push_bytes"] for s in worker.server_stats())


def _grads(params: dict) -> dict:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(v.shape, generator=g) for k, v in params.items()}


@pytest.mark.parametrize("codec", [ps.compress.FP16(), ps.compress.BF16(), ps.compress.Int8(), ps.compress.OneBit(),
                                   ps.compress.TopK(0.01), ps.compress.RandomK(0.01)], ids=repr)
def test_bytes_per_push_match_the_codecs_formula(one_worker, codec):
    worker, params = one_worker({"PS_SHM": "0"}, compression=codec)
    before = _push_bytes(worker)
    worker.push(_grads(params)).wait(timeout=30)
    # segments at most 64 KiB: "big" and "odd" are cut; "small" (40 bytes < 64 KiB) goes as it is
    want = sum(codec.nbytes(seg.numel) for name in ("big", "odd") for _, seg in worker.shard_map.segments_of(name))
    assert _push_bytes(worker) - before == want + 40
    raw = 4 * (40000 + 17003)
    assert want < raw / 1.9 if not isinstance(codec, (ps.compress.TopK, ps.compress.RandomK)) else want < raw / 40


@pytest.mark.parametrize("codec", [None, ps.compress.FP16(), ps.compress.BF16(), ps.compress.Int8()], ids=repr)
def test_bytes_per_pull_match_the_codecs_formula(one_worker, codec):
    worker, params = one_worker({"PS_SHM": "0"}, pull_compression=codec)
    before = sum(s["pull_bytes"] for s in worker.server_stats())
    worker.pull(params).wait(timeout=30)
    want = sum(payload_bytes(codec, seg.numel) for name in ("big", "odd") for _, seg in worker.shard_map.segments_of(name))
    assert sum(s["pull_bytes"] for s in worker.server_stats()) - before == want + 40  # "small" comes as it is


def test_patterns_pick_codecs_and_none_keeps_a_tensor_exact(one_worker):
    worker, params = one_worker({"PS_SHM": "0"}, compression={"odd": ps.compress.none, "b*": ps.compress.TopK(0.01),
                                                              "*": ps.compress.FP16()})
    before = _push_bytes(worker)
    grads = _grads(params)
    worker.push_pull(grads, into=params).wait(timeout=30)
    big = sum(ps.compress.TopK(0.01).nbytes(seg.numel) for _, seg in worker.shard_map.segments_of("big"))
    assert _push_bytes(worker) - before == big + 4 * 17003 + 40
    torch.testing.assert_close(params["odd"], -0.1 * grads["odd"])  # exact, as pushed
    assert (params["big"] != 0).sum() == sum(ps.compress.TopK(0.01).k(seg.numel)
                                             for _, seg in worker.shard_map.segments_of("big"))


def test_lanes_skip_compression_unless_ps_compress_local(one_worker):
    worker, params = one_worker({}, compression=ps.compress.Int8())
    before = _push_bytes(worker)
    worker.push(_grads(params)).wait(timeout=30)
    assert _push_bytes(worker) == before  # all through the shared-memory lanes, as they are
    assert sum(s["lane_requests"] for s in worker.server_stats()) > 0

    local, params = one_worker({"PS_COMPRESS_LOCAL": "1"}, compression=ps.compress.Int8())
    before = _push_bytes(local)
    local.push(_grads(params)).wait(timeout=30)
    want = sum(ps.compress.Int8().nbytes(seg.numel)
               for n in ("big", "odd") for _, seg in local.shard_map.segments_of(n))
    assert _push_bytes(local) - before == want  # the small tensor's block, with nothing compressed, takes its lane
    assert sum(s["lane_requests"] for s in local.server_stats()) > 0


def test_min_bytes_from_the_environment(one_worker):
    worker, params = one_worker({"PS_SHM": "0", "PS_COMPRESS_MIN_BYTES": str(4 * 40000)},
                                compression=ps.compress.FP16())
    before = _push_bytes(worker)
    worker.push(_grads(params)).wait(timeout=30)
    assert _push_bytes(worker) - before == 2 * 40000 + 4 * (17003 + 10)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("compression,words", [
    ("int8", "compression= takes a codec"),
    ({3: ps.compress.FP16()}, "pattern 3 is a int"),
    ({"*": "fp16"}, "maps to 'fp16', not a codec"),
    ({"fc.*": ps.compress.TopK(0.01)}, "'fc.*' matches none of the registered tensors"),
])
def test_bad_compression_is_a_clear_error_before_anything_is_sent(one_worker, compression, words):
    worker, params = one_worker({})
    with pytest.raises(ps.ConfigError, match=words.replace("*", r"\*").replace(".", r"\.")):
        worker.register(params, optimizer=ps.optim.SGD(lr=0.1), compression=compression)
    worker.register(params, optimizer=ps.optim.SGD(lr=0.1))  # nothing was registered: it can be done now


def test_bad_pull_compression_and_bad_ratios_are_clear_errors(one_worker):
    worker, params = one_worker({})
    for pull in (ps.compress.TopK(0.1), ps.compress.Int8(error_feedback=True)):
        with pytest.raises(ps.ConfigError, match=r"pull_compression= takes ps.compress.FP16\(\), BF16\(\) or Int8"):
            worker.register(params, optimizer=ps.optim.SGD(lr=0.1), pull_compression=pull)
    with pytest.raises(ps.ConfigError, match=r"TopK\(ratio=2\): ratio must be a number in \(0, 1\]"):
        ps.compress.TopK(2)


def test_a_nan_gradient_is_an_error_naming_the_tensor(one_worker):
    worker, params = one_worker({"PS_SHM": "0"}, compression=ps.compress.Int8())
    grads = _grads(params)
    grads["odd"][5] = math.nan
    with pytest.raises(ps.ConfigError, match="gradient of 'odd' has NaN values"):
        worker.push(grads)


def _request(worker, header: P.Message, frames: list) -> None:
    future = Future(worker.client)
    request = Request(future, 0, frames=[P.encode(header), *frames])
    worker.client.submit(request, header.req)
    future.wait(timeout=30)


def test_the_server_refuses_unknown_codecs_and_frames_of_the_wrong_size(one_worker):
    worker, _ = one_worker({"PS_SHM": "0"}, compression=ps.compress.Int8())
    block = next(b for b in worker.shard_map.blocks if b.server == 0 and len(b.segments) == 1)
    push = dict(block=block.block_id, rank=worker.rank, dtype="float32")
    with pytest.raises(ps.BadRequestError, match="unknown codec 'zip'"):
        _request(worker, P.Push(req=worker.client.next_id(), codecs=["zip"], **push), [b"x"])
    size = ps.compress.Int8().nbytes(block.numel)
    with pytest.raises(ps.BadRequestError, match=rf"int8/256\) has {size - 1} bytes, expected {size}"):
        _request(worker, P.Push(req=worker.client.next_id(), codecs=["int8/256"], **push), [bytes(size - 1)])
    with pytest.raises(ps.BadRequestError, match="1 codecs for 2 segments|codecs only"):
        _request(worker, P.Pull(req=worker.client.next_id(), codecs=["int8/256"], **push), [])
    with pytest.raises(ps.BadRequestError, match="pulls are rounded with fp16, bf16 or int8 only"):
        _request(worker, P.Pull(req=worker.client.next_id(), pull_codecs=["topk/0.1"], **push), [])
    _request(worker, P.Push(req=worker.client.next_id(), codecs=["int8/256"], **push), [bytes(size)])  # still serving
