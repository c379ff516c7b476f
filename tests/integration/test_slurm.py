"""ps-launch under a real Slurm: two nodes (two slurmd) on this machine, jobs submitted with sbatch.

Every job carries a unique PS_JOB_ID (sbatch passes the environment on, ps-launch and srun pass it
to every process), so ``assert_no_leftovers`` finds anything of the job, on either node.
"""

from __future__ import annotations

import contextlib
import json
import re
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import torch

from tests.integration import slurm_cluster as sc
from tests.integration.launch_helpers import (FAST_HEARTBEATS, REPO, TRAIN_SCRIPT, assert_no_leftovers,
                                              job_processes, reference_params, root_cause_block)

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(120)]

PY = sys.executable
JOB_TIMEOUT = 90.0
_DONE_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = sc.unavailable_reason()
    if reason:
        pytest.skip(reason)
    stack = contextlib.ExitStack()
    try:
        started = stack.enter_context(sc.slurm_cluster(tmp_path_factory.mktemp("slurm")))
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        pytest.skip(f"could not start a Slurm here: {exc}")
    with stack:
        yield started


class BatchJob:
    """One sbatch job running ``script`` (bash), with its own PS_JOB_ID; cancelled if still there at the end."""

    def __init__(self, cluster: sc.SlurmCluster, tmp_path: Path, script: str, *sbatch_args: str):
        self.cluster = cluster
        self.ps_job_id = f"pstest-{uuid.uuid4().hex[:12]}"
        self.output = tmp_path / "slurm.out"
        path = tmp_path / "job.sh"
        path.write_text(f"#!/bin/bash\ncd {shlex.quote(str(REPO))}\n{script}\n")
        env = {**cluster.env, "PYTHONPATH": str(REPO), "PS_JOB_ID": self.ps_job_id, **FAST_HEARTBEATS}
        done = cluster.run(["sbatch", "--parsable", "-o", str(self.output), *sbatch_args, str(path)], env=env)
        assert done.returncode == 0, done.stderr
        self.id = done.stdout.strip().split(";")[0]

    def state(self) -> tuple[str, str]:
        """(JobState, ExitCode) as scontrol shows them."""
        text = self.cluster.run(["scontrol", "-o", "show", "job", self.id]).stdout
        state = re.search(r"\bJobState=(\S+)", text)
        code = re.search(r"\bExitCode=(\S+)", text)
        return (state.group(1) if state else "UNKNOWN", code.group(1) if code else "")

    def wait(self, timeout: float = JOB_TIMEOUT) -> tuple[str, str]:
        # sbatch --wait polls with a back-off of up to 10 s; this finds the end within 0.2 s
        deadline = time.monotonic() + timeout
        while (state := self.state())[0] not in _DONE_STATES:
            assert time.monotonic() < deadline, f"job {self.id} still {state[0]} after {timeout} s:\n{self.text()}"
            time.sleep(0.2)
        return state

    def text(self) -> str:
        return self.output.read_text() if self.output.exists() else ""

    def cancel(self) -> None:
        self.cluster.run(["scancel", self.id])


@pytest.fixture
def batch(cluster, tmp_path):
    jobs: list[BatchJob] = []

    def submit(script: str, *sbatch_args: str) -> BatchJob:
        job = BatchJob(cluster, tmp_path, script, *sbatch_args)
        jobs.append(job)
        return job

    yield submit
    for job in jobs:
        job.cancel()
        for pid, _ in job_processes(job.ps_job_id):
            sc._stop([pid])


def _ps_launch(*args: str) -> str:
    return shlex.join([PY, "-m", "psframework.launch", "--server-device", "cpu", *args])


def test_sbatch_job_spans_two_nodes(batch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = batch(_ps_launch("-s", "2", "--", PY, str(TRAIN_SCRIPT), str(out)), "-N", "2", "--ntasks-per-node", "1")
    state, code = job.wait()
    assert (state, code) == ("COMPLETED", "0:0"), job.text()
    assert "ps-launch: job finished" in job.text()
    reference = reference_params()
    for rank, node in enumerate(("n1", "n2")):
        info = json.loads((out / f"worker-{rank}.json").read_text())
        assert (info["host"], info["slurm_node"]) == (node, node), info
        params = torch.load(out / f"worker-{rank}.pt")
        for name, value in reference.items():
            assert torch.allclose(params[name], value, atol=1e-6), name
        secret = Path(info["secret_file"])
        assert not secret.exists() and not secret.parent.exists(), f"{secret} outlived the job"
    assert_no_leftovers(job.ps_job_id)


def test_sbatch_trains_the_digits_model(batch):
    """The issue's job: ps-launch with 1 server and 2 workers training the digits model under
    sbatch --wait; it finishes and the accuracy is in the job's output."""
    job = batch(_ps_launch("-s", "1", "--", PY, str(REPO / "examples" / "train_digits.py"), "--epochs", "2"),
                "-N", "2", "--ntasks-per-node", "1")
    state, code = job.wait()
    assert (state, code) == ("COMPLETED", "0:0"), job.text()
    accuracy = re.findall(r"epoch 2/2 .*held-out accuracy (\d\.\d+)", job.text())
    assert accuracy and float(accuracy[-1]) > 0.8, job.text()
    assert_no_leftovers(job.ps_job_id)


def test_failing_worker_on_the_other_node_is_the_root_cause(batch, tmp_path):
    job = batch(_ps_launch("--", PY, str(TRAIN_SCRIPT), str(tmp_path), "--fail-rank", "1", "--fail-code", "3"),
                "-N", "2", "--ntasks-per-node", "1")
    state, code = job.wait()
    assert (state, code) == ("FAILED", "1:0"), job.text()
    report = root_cause_block(job.text())
    assert re.match(r"ps-launch: ROOT CAUSE: worker 1 \(host n2, pid \d+\): exit code 3$", report[0]), report
    assert "worker 1: failing on purpose at step 0" in "\n".join(report)
    assert_no_leftovers(job.ps_job_id)


def test_scancel_leaves_no_process(batch, cluster, tmp_path):
    job = batch(_ps_launch("--", PY, str(TRAIN_SCRIPT), str(tmp_path), "--pause-rank", "1"),
                "-N", "2", "--ntasks-per-node", "1")
    paused = tmp_path / "worker-1.paused"
    deadline = time.monotonic() + JOB_TIMEOUT
    while not paused.exists():
        assert time.monotonic() < deadline and job.state()[0] in ("PENDING", "RUNNING"), job.text()
        time.sleep(0.2)
    assert len(job_processes(job.ps_job_id)) >= 5  # scheduler, server, 2 workers, remote agents
    cancelled_at = time.monotonic()
    job.cancel()
    assert job.wait()[0] == "CANCELLED", job.text()
    assert_no_leftovers(job.ps_job_id, timeout=10)
    assert time.monotonic() - cancelled_at < 15
    # no job step can run after scancel: the secret's copy on n2 went with its agent
    assert not list(Path(tempfile.gettempdir()).glob(f"ps-launch-{job.ps_job_id}-*")), "job secret left behind"


def test_plain_srun_with_from_slurm(batch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    task = shlex.join([PY, "-m", "psframework.launch", "--from-slurm", "-s", "1", "--auth", "none",
                       "--server-device", "cpu", "--", PY, str(TRAIN_SCRIPT), str(out)])
    job = batch(f"exec srun -n 4 --kill-on-bad-exit=1 {task}", "-N", "2", "--ntasks-per-node", "2")
    state, code = job.wait()
    assert (state, code) == ("COMPLETED", "0:0"), job.text()
    reference = reference_params()
    for rank, node in enumerate(("n2", "n2")):  # tasks 0, 1 (scheduler, server) on n1; 2, 3 on n2
        info = json.loads((out / f"worker-{rank}.json").read_text())
        assert (info["role"], info["slurm_node"]) == ("worker", node), info
        params = torch.load(out / f"worker-{rank}.pt")
        for name, value in reference.items():
            assert torch.allclose(params[name], value, atol=1e-6), name
    assert_no_leftovers(job.ps_job_id)
