"""Shared fixtures: clusters and worker processes that are always cleaned up, ports always free."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import psframework as ps
from psframework.procs import spawn, stop_all
from psframework.config import Timing

REPO = Path(__file__).resolve().parent.parent
FAST_TIMING = Timing(heartbeat_interval=0.2, heartbeat_timeout=2.0, start_timeout=30.0)


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    gpus = torch.cuda.device_count() if has_gpu else 0
    for item in items:
        # markers, not item.keywords: keywords also hold directory names, such as a checkout called gpu
        if item.get_closest_marker("gpu") and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU (torch.cuda.is_available() is False)"))
        if item.get_closest_marker("multigpu") and gpus < 2:
            item.add_marker(pytest.mark.skip(reason=f"needs 2 GPUs, this machine has {gpus}"))


@pytest.fixture
def make_cluster():
    """Start LocalClusters (fast heartbeats by default); all are stopped at teardown."""
    clusters = []

    def start(**kwargs) -> ps.LocalCluster:
        kwargs.setdefault("timing", FAST_TIMING)
        cluster = ps.LocalCluster(**kwargs)
        clusters.append(cluster)
        return cluster.start()

    yield start
    for cluster in clusters:
        for name in cluster.processes():  # shown by pytest only when the test failed
            print(f"--- {name} (last lines)\n{cluster.output(name, 25)}")
        cluster.__exit__(None, None, None)


class WorkerProcs:
    """Worker processes running a function of tests/integration/worker_tasks.py."""

    def __init__(self, cluster: ps.LocalCluster, task: str, n: int, tmp_path: Path, env=None, **kwargs):
        self.outs = [tmp_path / f"worker-{r}.pt" for r in range(n)]
        self.logs = [tmp_path / f"worker-{r}.log" for r in range(n)]
        env = {**cluster.env(), "PYTHONPATH": str(REPO), **(env or {})}
        self.procs = []
        for rank in range(n):
            argv = [sys.executable, "-m", "tests.integration.worker_tasks", task, str(self.outs[rank]),
                    json.dumps(kwargs)]
            with open(self.logs[rank], "wb") as log:
                self.procs.append(spawn(argv, {**env, "PS_RANK": str(rank)}, stdout=log,
                                                 stderr=subprocess.STDOUT, cwd=str(REPO)))

    def output(self, rank: int) -> str:
        return self.logs[rank].read_text(errors="replace")[-3000:]

    def join(self, timeout: float = 60.0, expect_ok: bool = True) -> list:
        try:
            for rank, proc in enumerate(self.procs):
                proc.wait(timeout=timeout)
                if expect_ok:
                    assert proc.returncode == 0, f"worker {rank} failed ({proc.returncode}):\n{self.output(rank)}"
        finally:
            stop_all(self.procs)
        return [torch.load(p) if p.exists() else None for p in self.outs]

    def join_one(self, rank: int, timeout: float = 60.0):
        """Wait for one worker to succeed; its result."""
        self.procs[rank].wait(timeout=timeout)
        assert self.procs[rank].returncode == 0, f"worker {rank} failed:\n{self.output(rank)}"
        return torch.load(self.outs[rank])

    def kill(self, rank: int) -> None:
        """SIGKILL one worker, whatever its state (a stopped process ignores SIGTERM until continued)."""
        if self.procs[rank].poll() is None:
            self.procs[rank].kill()
            self.procs[rank].wait(timeout=10)

    def stop(self) -> None:
        stop_all(self.procs)


@pytest.fixture
def worker_procs(tmp_path):
    started = []

    def start(cluster, task, n, env=None, **kwargs) -> WorkerProcs:
        """``n`` workers running ``task(**kwargs)`` with the cluster's variables and ``env``."""
        procs = WorkerProcs(cluster, task, n, tmp_path, env=env, **kwargs)
        started.append(procs)
        return procs

    yield start
    for procs in started:
        procs.stop()
