"""ps-launch across hosts: network namespaces with their own sshd stand in for machines.

ps-launch runs in the root namespace (not one of the job's hosts), so every process of the job is
started over ssh, and each host's processes bind that host's hostfile address.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.integration import netns as vnet
from tests.integration.launch_helpers import (REPO, TRAIN_SCRIPT, Launch, assert_no_leftovers, reference_params,
                                              root_cause_block)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(120)]

PY = sys.executable
RESUMABLE = str(REPO / "tests" / "integration" / "scripts" / "train_resumable.py")


@pytest.fixture
def cluster(tmp_path):
    reason = vnet.netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with vnet.virtual_cluster(2, tmp_path) as c:
        yield c


@pytest.fixture
def launch(tmp_path, cluster):
    runs: list[Launch] = []
    hostfile = tmp_path / "hosts.txt"
    # the explicit ssh port makes ps-launch pass -p, as it must for hosts whose sshd is not on 22
    hostfile.write_text("".join(f"{h.address}:{h.ssh_port} slots=1 servers=1\n" for h in cluster.hosts))

    def start(*args: str) -> Launch:
        run = Launch(["-H", str(hostfile), "--ssh-config", str(cluster.ssh_config), "--server-device", "cpu",
                      *args], tmp_path, tag=f"launch{len(runs)}")
        runs.append(run)
        return run

    yield start
    for run in runs:
        run.cleanup()


def _netns_id(cluster, host) -> str:
    return cluster.run_in(host, ["readlink", "/proc/self/ns/net"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _only_sshd_left(cluster, timeout: float = 5.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        left = {h.name: set(cluster.pids_in(h)) - {pid} for h, pid in zip(cluster.hosts, cluster.sshd_pids)}
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def test_sync_job_over_ssh(cluster, launch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = launch("-n", "2", "-s", "2", "--mode", "sync", "--verbose", "--", PY, str(TRAIN_SCRIPT),
                    str(out)).wait(timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr

    reference = reference_params()
    params = [torch.load(out / f"worker-{r}.pt") for r in range(2)]
    for name, value in reference.items():
        assert torch.equal(params[0][name], params[1][name]), name
        assert torch.allclose(params[0][name], value, atol=1e-6), name

    scheduler_host = cluster.hosts[0]
    assert f"[scheduler] PS_SCHEDULER_ADDRESS=tcp://{scheduler_host.address}:" in result.stdout
    for rank, host in enumerate(cluster.hosts):
        info = json.loads((out / f"worker-{rank}.json").read_text())
        assert info["host"] == host.address and info["bind"] == host.address
        assert info["netns"] == _netns_id(cluster, host), f"worker {rank} did not run in {host.name}"
        assert f"server {rank} serving on tcp://{host.address}:" in result.stdout
    assert _only_sshd_left(cluster) == {h.name: set() for h in cluster.hosts}

    # the job secret's copies on the hosts are gone too. The namespaces share this machine's files,
    # so each host's copy must sit apart from ps-launch's own (removed here) for this to show that
    # ps-launch removed it on that host.
    secrets = [Path(json.loads((out / f"worker-{r}.json").read_text())["secret_file"]) for r in range(2)]
    assert secrets[0] != secrets[1], secrets
    for secret in secrets:
        assert not secret.exists() and not secret.parent.exists(), f"{secret} outlived the job"


def test_remote_worker_killed_stops_everything(cluster, launch, tmp_path):
    run = launch("-n", "2", "-s", "2", "--", PY, str(TRAIN_SCRIPT), str(tmp_path), "--pause-rank", "1")
    paused = tmp_path / "worker-1.paused"
    deadline = time.monotonic() + 60
    while not (paused.exists() and paused.read_text()):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stdout()
        time.sleep(0.05)
    victim, host = int(paused.read_text()), cluster.hosts[1]
    assert victim in cluster.pids_in(host)
    cluster.run_in(host, ["kill", "-KILL", str(victim)], check=True)
    killed_at = time.monotonic()

    result = run.wait(timeout=30)
    assert time.monotonic() - killed_at < 10
    assert result.returncode == 1
    report = root_cause_block(result.stderr)
    assert report[0] == f"ps-launch: ROOT CAUSE: worker 1 (host {host.address}, pid {victim}): killed by SIGKILL"
    assert _only_sshd_left(cluster) == {h.name: set() for h in cluster.hosts}
    assert_no_leftovers(run.job_id)


def test_remote_processes_die_with_ps_launch(cluster, launch):
    # nothing stops them explicitly: the ssh clients die with ps-launch, and each remote_child sees EOF
    sleeper = [PY, "-c", "import time; print('ready', flush=True); time.sleep(120)"]
    run = launch("-n", "2", "-s", "1", "--", *sleeper)
    run.wait_for_output("[worker 1] ready", timeout=60)
    run.wait_for_output("[worker 0] ready", timeout=10)
    run.proc.kill()
    run.proc.wait(timeout=10)
    assert _only_sshd_left(cluster, timeout=8) == {h.name: set() for h in cluster.hosts}
    assert_no_leftovers(run.job_id)


def test_a_stopped_worker_on_another_host_is_ended(cluster, launch, tmp_path):
    # issue 21 across hosts: worker 1 stops itself (SIGSTOP) on the second host; its agent there
    # must continue it so that the SIGTERM lands, and say what it was doing
    host = cluster.hosts[1]
    run = launch("-n", "2", "-s", "1", "--mode", "async", "--elastic", "-x", "PS_SHM=0", "--",
                 PY, RESUMABLE, str(tmp_path), "--steps", "8", "--freeze-rank", "1", "--freeze-step", "3")
    run.wait_for_output("[worker 1] worker 1: stopping itself with SIGSTOP", timeout=60)
    deadline = time.monotonic() + 60
    while not (tmp_path / "worker-0.pt").exists():
        assert run.proc.poll() is None and time.monotonic() < deadline, run.stdout()[-3000:]
        time.sleep(0.05)
    finished = time.monotonic()
    result = run.wait(timeout=30)
    assert time.monotonic() - finished < 20, result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
    lost = next(line for line in result.stderr.splitlines() if "job finished" in line)
    assert "worker 1 (declared dead: no heartbeat for " in lost and "(state: stopped)" in lost, lost
    assert f"worker 1 (host {host.address}, pid " in result.stderr
    assert "ended by ps-launch: killed by SIGTERM" in result.stderr  # continued, so no SIGKILL was needed
    assert _only_sshd_left(cluster) == {h.name: set() for h in cluster.hosts}
    assert_no_leftovers(run.job_id)
