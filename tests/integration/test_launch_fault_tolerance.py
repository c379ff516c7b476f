"""ps-launch's checkpoint, restart and elastic options, with real jobs."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration.launch_helpers import REPO, Launch, assert_no_leftovers, job_processes, root_cause_block

pytestmark = pytest.mark.timeout(120)

PY = sys.executable
SCRIPT = str(REPO / "tests" / "integration" / "scripts" / "train_resumable.py")


@pytest.fixture
def launch(tmp_path):
    runs: list[Launch] = []

    def start(*args: str, env=None) -> Launch:
        run = Launch(args, tmp_path, env=env, tag=f"launch{len(runs)}")
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def _outdir(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    return path


def _pid_of(job_id: str, role: str, rank: int) -> int:
    for pid, _ in job_processes(job_id):
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"PS_ROLE={role}".encode() in environ and f"PS_RANK={rank}".encode() in environ:
            return pid
    raise AssertionError(f"no {role} {rank} in job {job_id}")


def test_stopped_and_resumed_job_equals_a_straight_one(launch, tmp_path):
    ckpt = tmp_path / "ckpt"
    base = ["-n", "2", "-s", "2", "--server-device", "cpu"]
    straight, first, resumed = (_outdir(tmp_path, n) for n in ("straight", "first", "resumed"))
    assert launch(*base, "--", PY, SCRIPT, str(straight)).wait(60).returncode == 0
    run = launch(*base, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "7", "--",
                 PY, SCRIPT, str(first), "--stop-after", "7")
    assert run.wait(60).returncode == 0
    assert (ckpt / "step-00000007" / "manifest.json").exists()
    run = launch(*base, "--checkpoint-dir", str(ckpt), "--resume", "--", PY, SCRIPT, str(resumed))
    result = run.wait(60)
    assert result.returncode == 0, result.stderr
    want = torch.load(straight / "worker-0.pt")["params"]
    for rank in range(2):
        got = torch.load(resumed / f"worker-{rank}.pt")
        assert got["start_step"] == 7
        for key, value in want.items():
            assert torch.equal(got["params"][key], value), key


def test_a_killed_server_is_restarted_and_the_job_finishes(launch, tmp_path):
    out = _outdir(tmp_path, "out")
    run = launch("-n", "2", "-s", "2", "--server-device", "cpu", "--checkpoint-dir", str(tmp_path / "ckpt"),
                 "--checkpoint-every", "2", "--restart-failed-servers", "--",
                 PY, SCRIPT, str(out), "--steps", "24", "--sleep", "0.1")
    run.wait_for_output("[worker 0] worker 0 done step 6", timeout=60)
    os.kill(_pid_of(run.job_id, "server", 1), signal.SIGKILL)
    result = run.wait(90)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "server 1" in result.stderr and "restarting it (restart 1 of 3)" in result.stderr
    assert "rolled back" in result.stdout
    finals = [torch.load(out / f"worker-{r}.pt")["params"] for r in range(2)]
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key])
    assert_no_leftovers(run.job_id)


def test_without_the_flag_a_dead_server_stops_the_job(launch, tmp_path):
    run = launch("-n", "1", "-s", "2", "--server-device", "cpu", "--",
                 PY, SCRIPT, str(_outdir(tmp_path, "out")), "--steps", "200", "--sleep", "0.05")
    run.wait_for_output("[worker 0] worker 0 done step 2", timeout=60)
    pid = _pid_of(run.job_id, "server", 1)
    os.kill(pid, signal.SIGKILL)
    result = run.wait(30)
    assert result.returncode == 1
    assert f"ROOT CAUSE: server 1 (host 127.0.0.1, pid {pid}): killed by SIGKILL" in result.stderr
    assert_no_leftovers(run.job_id)


def test_an_elastic_job_goes_on_without_a_failed_worker(launch, tmp_path):
    out = _outdir(tmp_path, "out")
    run = launch("-n", "3", "-s", "1", "--server-device", "cpu", "--elastic", "--",
                 PY, SCRIPT, str(out), "--steps", "8", "--fail-rank", "2", "--fail-step", "3")
    result = run.wait(90)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    assert "worker 2" in result.stderr and "goes on without it" in result.stderr
    finals = [torch.load(out / f"worker-{r}.pt")["params"] for r in range(2)]
    assert not (out / "worker-2.pt").exists()
    for key in finals[0]:
        assert torch.equal(finals[0][key], finals[1][key])
    assert_no_leftovers(run.job_id)


def _wait_for_files(run: Launch, paths: list[Path], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        assert run.proc.poll() is None, f"ps-launch exited early:\n{run.stdout()[-3000:]}"
        assert time.monotonic() < deadline, f"no {paths} within {timeout} s:\n{run.stdout()[-3000:]}"
        time.sleep(0.05)


def test_a_stopped_worker_is_ended_and_named(launch, tmp_path):
    # the scenario: worker 2 stops itself (SIGSTOP); a SIGTERM alone never reaches it
    out = _outdir(tmp_path, "out")
    run = launch("-n", "3", "-s", "1", "--mode", "async", "--elastic", "--server-device", "cpu", "-x", "PS_SHM=0",
                 "--", PY, SCRIPT, str(out), "--steps", "8", "--freeze-rank", "2", "--freeze-step", "3",
                 env={"PS_HEARTBEAT_TIMEOUT": "2"})
    run.wait_for_output("[worker 2] worker 2: stopping itself with SIGSTOP", timeout=60)
    pid = _pid_of(run.job_id, "worker", 2)
    _wait_for_files(run, [out / "worker-0.pt", out / "worker-1.pt"], timeout=60)
    finished = time.monotonic()
    result = run.wait(timeout=30)
    assert time.monotonic() - finished < 15, result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lost = next(line for line in result.stderr.splitlines() if "job finished" in line)
    assert "worker 2" in lost and "declared dead: no heartbeat for" in lost and "(state: stopped)" in lost, lost
    assert f"worker 2 (host 127.0.0.1, pid {pid})" in result.stderr
    assert_no_leftovers(run.job_id)


def test_without_elastic_a_stopped_worker_is_the_root_cause(launch, tmp_path):
    run = launch("-n", "2", "-s", "1", "--server-device", "cpu", "--", PY, SCRIPT, str(_outdir(tmp_path, "out")),
                 "--steps", "8", "--freeze-rank", "1", "--freeze-step", "3", env={"PS_HEARTBEAT_TIMEOUT": "2"})
    run.wait_for_output("[worker 1] worker 1: stopping itself with SIGSTOP", timeout=60)
    pid = _pid_of(run.job_id, "worker", 1)
    result = run.wait(timeout=30)
    assert result.returncode == 1, result.stderr
    report = root_cause_block(result.stderr)
    assert report[0].startswith(f"ps-launch: ROOT CAUSE: worker 1 (host 127.0.0.1, pid {pid}): declared dead: "
                                "no heartbeat for "), report
    assert "(state: stopped)" in report[0], report
    assert_no_leftovers(run.job_id)
