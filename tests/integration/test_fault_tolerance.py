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
        on_server_1 = torch.zeros(4000, dtype=torch.bool)
        for block, seg in worker.shard_map.segments_of("big"):
            if block.server == 1:
                on_server_1[seg.offset:seg.offset + seg.numel] = True
        os.kill(cluster.processes()["server-1"].pid, signal.SIGKILL)
        cluster.restart_server(1)  # at once: before the scheduler could notice the death by heartbeats
        for _ in range(2):
            worker.push_pull(ones, into=params).wait(timeout=30)
        if worker.lanes.lanes:  # the new server process got a lane of its own, and used it
            assert worker.server_stats()[1]["lane_requests"] >= 2
    # server 1's shards lost the 2 steps after the checkpoint; server 0's did not
    assert torch.equal(params["big"][on_server_1], torch.full((int(on_server_1.sum()),), -5.0))
    assert torch.equal(params["big"][~on_server_1], torch.full((int((~on_server_1).sum()),), -7.0))
    time.sleep(0.5)
    log = cluster.output("scheduler", 100)
    assert "rolled back 2 steps" in log, log


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
