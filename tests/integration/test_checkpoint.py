"""Checkpoints: consistent, atomic, verified, and a resumed job ends exactly where a straight one does."""

from __future__ import annotations

import json

import pytest
import torch

import psframework as ps
from psframework import checkpoint
from tests.integration import models


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_stopped_after_step_7_and_resumed_equals_a_straight_run(make_cluster, worker_procs, tmp_path, optimizer):
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=4096)
    straight = worker_procs(cluster, "sync_train", 2, optimizer=optimizer, steps=10).join()

    for phase, kwargs in (("first", dict(stop_after=7, every=7)), ("resumed", dict(resume=True, every=0))):
        cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=4096)
        env = {**cluster.env(), "PS_CHECKPOINT_DIR": str(tmp_path / "ckpt"),
               "PS_CHECKPOINT_EVERY": str(kwargs["every"]), "PS_RESUME": "1" if kwargs.get("resume") else "0"}
        cluster.env = lambda env=env: env
        results = worker_procs(cluster, "checkpointed_train", 2, optimizer=optimizer, total_steps=10,
                               stop_after=kwargs.get("stop_after", 0)).join()
        if phase == "first":
            assert (tmp_path / "ckpt" / "step-00000007" / "manifest.json").exists()
            assert all(r["start_step"] == 0 for r in results)
    assert all(r["start_step"] == 7 for r in results)
    for result in results:
        for key, value in straight[0].items():
            assert torch.equal(result["params"][key], value), f"{key} differs after resuming"


@pytest.fixture
def checkpointed(make_cluster, tmp_path):
    """One worker, 2 servers, a checkpoint at step 3 and one at step 5."""
    cluster = make_cluster(num_servers=2, num_workers=1, chunk_bytes=4096)
    worker = ps.init(scheduler=cluster.scheduler)
    params = models.make_params(0)
    worker.register(params, optimizer=ps.optim.Adam(lr=0.01))
    snapshots = {}
    for step in range(1, 6):
        worker.push_pull({k: torch.ones_like(v) * step for k, v in params.items()}, into=params).wait(timeout=10)
        if step in (3, 5):
            worker.save_checkpoint(tmp_path / "ckpt")
            snapshots[step] = {k: v.clone() for k, v in params.items()}
    yield worker, params, snapshots, tmp_path / "ckpt"
    worker.close()


def test_checkpoint_layout_and_manifest(checkpointed):
    worker, params, snapshots, root = checkpointed
    manifest = json.loads((root / "step-00000005" / "manifest.json").read_text())
    assert manifest["step"] == 5 and manifest["mode"] == "sync" and manifest["num_servers"] == 2
    assert set(manifest["files"]) == {"server-0.pt", "server-1.pt"}
    assert manifest["optimizer"]["name"] == "adam"
    assert not list(root.rglob("*.tmp*"))


def test_load_restores_values_and_optimizer_state(checkpointed):
    worker, params, snapshots, root = checkpointed
    worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=10)
    assert worker.load_checkpoint(root) == 5
    for key, value in snapshots[5].items():
        assert torch.equal(params[key], value)
    # the optimizer state came back too: the same push gives the same result twice
    grads = {k: torch.full_like(v, 0.5) for k, v in params.items()}
    worker.push_pull(grads, into=params).wait(timeout=10)
    after_first = {k: v.clone() for k, v in params.items()}
    worker.load_checkpoint(root)
    worker.push_pull(grads, into=params).wait(timeout=10)
    for key in params:
        assert torch.equal(params[key], after_first[key])


def test_an_interrupted_checkpoint_falls_back_to_the_previous_one(checkpointed):
    worker, params, snapshots, root = checkpointed
    (root / "step-00000005" / "manifest.json").unlink()  # as if the job died before the manifest
    assert worker.load_checkpoint(root) == 3
    for key, value in snapshots[3].items():
        assert torch.equal(params[key], value)


def test_a_corrupt_file_is_a_clear_error(checkpointed):
    worker, params, snapshots, root = checkpointed
    path = root / "step-00000005" / "server-1.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ps.CheckpointError, match="server-1.pt is corrupt"):
        worker.load_checkpoint(root)


def test_no_checkpoint_yet_is_not_an_error(checkpointed, tmp_path):
    worker, params, snapshots, root = checkpointed
    assert worker.load_checkpoint(tmp_path / "empty") is None


@pytest.mark.parametrize("servers, chunk, refusal", [
    (1, 4096, "2 servers"),
    # the same tensors in blocks of another size (a default that changed, as for one GPU server):
    # the error says which PS_CHUNK_BYTES the checkpoint needs
    (2, 8192, "blocks of 4096 bytes.*8192.*PS_CHUNK_BYTES=4096"),
], ids=["other servers", "other blocks"])
def test_a_checkpoint_of_another_job_shape_is_refused_saying_why(make_cluster, checkpointed, servers, chunk, refusal):
    _, _, _, root = checkpointed
    cluster = make_cluster(num_servers=servers, num_workers=1, chunk_bytes=chunk)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register(models.make_params(0), optimizer=ps.optim.Adam(lr=0.01))
        with pytest.raises(ps.CheckpointError, match=refusal):
            worker.load_checkpoint(root)


def test_write_atomic_and_find_latest(tmp_path):
    sha = checkpoint.write_atomic(tmp_path / "a" / "f.bin", b"hello")
    assert (tmp_path / "a" / "f.bin").read_bytes() == b"hello" and len(sha) == 64
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["f.bin"]
    assert checkpoint.find_latest(tmp_path / "nothing") is None
    for step in (2, 10):
        checkpoint.write_manifest(tmp_path / "c" / checkpoint.tag_for(step), {"step": step, "files": {}})
    (tmp_path / "c" / checkpoint.tag_for(11)).mkdir()  # incomplete
    directory, manifest = checkpoint.find_latest(tmp_path / "c")
    assert directory.name == "step-00000010" and manifest["step"] == 10
    # a second checkpoint of step 10 (after the job went back to it) gets a name of its own, found first
    again = checkpoint.directory_for(tmp_path / "c", 10)
    assert again.name == "step-00000010-1" and checkpoint.directory_for(tmp_path / "c", 11).name == "step-00000011"
    checkpoint.write_manifest(again, {"step": 10, "files": {}})
    assert checkpoint.find_latest(tmp_path / "c")[0] == again
    assert checkpoint.directory_for(tmp_path / "c", 10).name == "step-00000010-2"
    checkpoint.write_manifest(tmp_path / "d" / "step-00000001", {"step": 1, "files": {"x.pt": {}}})
    with pytest.raises(ps.CheckpointError, match="x.pt, which is missing"):
        checkpoint.read_manifest(tmp_path / "d" / "step-00000001")


def test_async_checkpoint_is_a_consistent_cut(make_cluster, tmp_path):
    """Workers pushing different amounts asynchronously: the snapshot holds exactly the pushes made
    before every worker reached save_checkpoint, on every server."""
    from tests.threads import run_in_threads

    cluster = make_cluster(num_servers=2, num_workers=2, mode="async", chunk_bytes=4096)

    def work(i: int) -> dict:
        pushes = (5, 11)[i]
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"big": torch.zeros(4000)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            futures = [worker.push({"big": torch.ones(4000)}) for _ in range(pushes)]  # not waited: in flight
            worker.save_checkpoint(tmp_path / "ckpt", step=1)
            completed = all(f.done() for f in futures)  # save_checkpoint completed what was in flight
            worker.pull(params).wait(timeout=10)
            seen = params["big"].clone()
            worker.barrier()  # nobody pushes again before both have looked
            for _ in range(3):
                worker.push({"big": torch.ones(4000)}).wait(timeout=10)
            worker.barrier()
            step = worker.load_checkpoint(tmp_path / "ckpt")
            return {"completed": completed, "seen": seen, "step": step, "restored": params["big"].clone()}

    results = run_in_threads(2, work, timeout=60)
    for result in results:
        assert result["completed"] and result["step"] == 1
        assert torch.equal(result["seen"], torch.full((4000,), -16.0))
        assert torch.equal(result["restored"], torch.full((4000,), -16.0))


@pytest.mark.gpu
def test_checkpoint_round_trip_with_shards_on_gpu(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=2, num_workers=1, chunk_bytes=4096, server_device="cuda")
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.Adam(lr=0.01))
        for step in range(3):
            worker.push_pull({k: torch.ones_like(v) * (step + 1) for k, v in params.items()}, into=params).wait(10)
        worker.save_checkpoint(tmp_path / "ckpt")
        snapshot = {k: v.clone() for k, v in params.items()}
        worker.push_pull({k: torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=10)
        assert worker.load_checkpoint(tmp_path / "ckpt") == 3
        fresh = {k: torch.zeros_like(v) for k, v in params.items()}
        worker.pull(fresh).wait(timeout=10)  # served from the device, not from a stale reply buffer
        for key, value in snapshot.items():
            assert torch.equal(params[key], value) and torch.equal(fresh[key], value), key
