"""Losing workers (elastic) and servers (restarted from a checkpoint) without losing the job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import psframework as ps
from tests.integration import models
from tests.conftest import REPO

CHUNK = 4096


def test_elastic_workers_continue_and_a_new_one_joins(make_cluster, worker_procs, tmp_path):
    flags = tmp_path / "flags"
    flags.mkdir()
    cluster = make_cluster(num_servers=2, num_workers=3, mode="sync", elastic=True, chunk_bytes=CHUNK)
    originals = worker_procs(cluster, "elastic_train", 3, flag_dir=str(flags), victim=2, die_at=3)
    deadline = time.monotonic() + 60
    while not all((flags / f"done-{r}").exists() for r in (0, 1)) and time.monotonic() < deadline:
        assert all(p.poll() in (None, 0, 17) for p in originals.procs), originals.output(0)
        time.sleep(0.1)
    assert originals.procs[2].wait(timeout=5) == 17
    (flags / "originals-done").touch()
    out = tmp_path / "joiner.pt"
    env = {**os.environ, **cluster.env(), "PYTHONPATH": str(REPO)}
    env.pop("PS_RANK", None)
    joiner = subprocess.run([sys.executable, "-m", "tests.integration.worker_tasks", "elastic_train", str(out),
                             f'{{"flag_dir": "{flags}"}}'], env=env, cwd=REPO, timeout=90,
                            capture_output=True, text=True)
    assert joiner.returncode == 0, joiner.stdout + joiner.stderr
    survivors = originals.join(timeout=60, expect_ok=False)[:2]
    # 3 steps with all three (mean 2), 7 with the two survivors (mean 1.5), then 5 with the joiner (mean 2)
    first = -(3 * 2.0 + 7 * 1.5)
    joined = torch.load(out)
    assert joined["rank"] == 2 and joined["joined_at"] == first
    for result in [*survivors, joined]:
        assert result["after_first"] == first
        assert torch.equal(result["final"], torch.full((1000,), first - 5 * 2.0))


def test_a_restarted_server_reloads_the_checkpoint_and_training_goes_on(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=2, num_workers=1, restart_servers=True, checkpoint_dir=tmp_path / "ckpt",
                           chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"big": torch.zeros(4000)}  # 16 KB: 4 blocks over both servers
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        ones = {"big": torch.ones(4000)}
        for step in range(5):
            worker.push_pull(ones, into=params).wait(timeout=10)
            if step == 2:
                worker.save_checkpoint(tmp_path / "ckpt")
        os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
        cluster.restart_server(1)  # at once: before the scheduler could notice the death by heartbeats
        with pytest.raises(ps.RolledBackError) as info:
            worker.push_pull(ones, into=params).wait(timeout=30)
        assert info.value.step == 3 and worker.steps == 3
        worker.pull(params).wait(timeout=30)
        # every server went back to the checkpoint, not only the restarted one: one step of the model
        assert torch.equal(params["big"], torch.full((4000,), -3.0))
        for _ in range(2):
            worker.push_pull(ones, into=params).wait(timeout=30)
        if worker.lanes.lanes:  # the new server process got a lane of its own, and used it
            assert worker.server_stats()[1]["lane_requests"] >= 2
        assert worker.steps == 5
    assert torch.equal(params["big"], torch.full((4000,), -5.0))
    time.sleep(0.5)
    log = cluster.output("scheduler", 100)
    assert ("the job rolled back 2 steps, from about step 5 to step 3: server 1 restarted, and every server "
            "reloaded step-00000003") in log, log


def test_a_dead_server_without_a_checkpoint_fails_clearly(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=2, num_workers=1, restart_servers=True, checkpoint_dir=tmp_path / "none",
                           chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"big": torch.zeros(4000)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
        cluster.restart_server(1)
        with pytest.raises(ps.PeerLostError, match="no complete checkpoint"):
            for _ in range(1000):
                worker.push_pull({"big": torch.ones(4000)}, into=params).wait(timeout=30)


@pytest.mark.parametrize("overlap", [True, False])
def test_distributed_optimizer_goes_on_from_the_checkpoint_a_restarted_server_brings_back(make_cluster, tmp_path,
                                                                                       overlap):
    """Checkpoints every 2 steps; server 1 is killed and restarted before step 5: that step fails,
    the whole job is back at the checkpoint of step 4 (step 4 is lost with it), and training goes
    on with the batches that follow, exactly as one process that saw batches 0-3, 6 and 7."""
    cluster = make_cluster(num_servers=2, num_workers=1, restart_servers=True, checkpoint_dir=tmp_path / "ckpt",
                           chunk_bytes=CHUNK)
    model, params = _dense_model()
    worker = ps.init(scheduler=cluster.scheduler)
    with ps.DistributedOptimizer(model, models.optimizer_spec("sgd"), worker, overlap=overlap,
                                 checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2) as opt:
        for step in range(8):
            if step == 5:
                os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
                cluster.restart_server(1)
            x, y = models.batch(step)
            opt.zero_grad()
            models.loss_fn(params, x, y).backward()
            opt.step()
        assert opt.step_count == 6
    worker.close()
    _assert_as_one_process_that_saw(params, batches=(0, 1, 2, 3, 6, 7))


@pytest.mark.parametrize("heard_by", ["training thread", "communication thread"])
def test_a_rollback_heard_between_forward_and_backward_drops_that_step_whole(make_cluster, tmp_path, heard_by):
    """With overlap, the job goes back to a checkpoint after batch 5's forward ran on the old model;
    the worker draws the consequences before backward (as a table lookup in the forward does) or while the communication thread sends the gradients. Either way that step is dropped
    whole (none of its blocks reaches a server, though the rollback was known when they were
    handed over) and the next step runs normally, exactly as one process that saw batches 0-3, 6
    and 7."""
    cluster = make_cluster(num_servers=2, num_workers=1, restart_servers=True, checkpoint_dir=tmp_path / "ckpt",
                           chunk_bytes=CHUNK)
    model, params = _dense_model()
    worker = ps.init(scheduler=cluster.scheduler)
    with ps.DistributedOptimizer(model, models.optimizer_spec("sgd"), worker, overlap=True,
                                 checkpoint_dir=str(tmp_path / "ckpt"), checkpoint_every=2) as opt:
        for step in range(8):
            x, y = models.batch(step)
            opt.zero_grad()
            loss = models.loss_fn(params, x, y)
            if step == 5:
                os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
                cluster.restart_server(1)
                deadline = time.monotonic() + 20
                while worker.membership.rollback[0] == 0 and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert worker.membership.rollback[0] == 1, "the worker never heard of the rollback"
                if heard_by == "training thread":
                    worker.client.catch_up()  # what a table lookup or a pull in the forward does
                    assert worker.client.rollback == 1
            loss.backward()
            if step == 5:  # the communication thread drew the rollback's consequences before step()
                deadline = time.monotonic() + 10
                while worker.client.rollback == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
            opt.step()
        assert opt.step_count == 6
    worker.close()
    _assert_as_one_process_that_saw(params, batches=(0, 1, 2, 3, 6, 7))


def _dense_model() -> tuple[torch.nn.Module, dict[str, torch.nn.Parameter]]:
    model = torch.nn.Module()
    for name, value in models.make_params(0).items():
        model.register_parameter(name, torch.nn.Parameter(value))
    return model, dict(model.named_parameters())


def _assert_as_one_process_that_saw(params: dict, batches: tuple[int, ...]) -> None:
    reference = {k: v.clone().requires_grad_(True) for k, v in models.make_params(0).items()}
    torch_opt = models.torch_optimizer("sgd", list(reference.values()))
    for step in batches:
        torch_opt.zero_grad()
        models.loss_fn(reference, *models.batch(step)).backward()
        torch_opt.step()
    for key, value in reference.items():
        torch.testing.assert_close(params[key].detach(), value.detach(), rtol=1e-5, atol=1e-6)
