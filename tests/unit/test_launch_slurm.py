"""ps-launch in a Slurm allocation, without Slurm: what build_config makes of Slurm's variables."""

from __future__ import annotations

import dataclasses

import pytest

from psframework.launch import cli
from psframework.launch.commands import host_addresses, node_processes, scheduler_process
from psframework.launch.slurm import allocation_from_env
from psframework.errors import ConfigError

ALLOCATION = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2,1",
              "SLURMD_NODENAME": "n1"}


@pytest.fixture(autouse=True)
def node_addrs(monkeypatch):
    monkeypatch.setattr(cli, "node_addresses", lambda nodes: {"n1": "10.9.0.1", "n2": "10.9.0.2"})


def _config(environ, hostfile=None, **options):
    return cli.build_config(("python", "train.py"), hostfile, (), 30.0, environ=environ, **options)


def test_inside_an_allocation_hosts_come_from_slurm_and_others_start_by_srun():
    cfg = _config(ALLOCATION)
    assert cfg.launcher == "slurm"
    assert [(p.role, p.rank, p.host) for p in cfg.layout.all()] == [
        ("scheduler", 0, "n1"), ("server", 0, "n1"), ("worker", 0, "n1"), ("worker", 1, "n1"), ("worker", 2, "n2")]
    addresses = host_addresses(cfg)
    assert addresses == {"n1": "10.9.0.1", "n2": "10.9.0.2"}
    assert scheduler_process(cfg, addresses).local
    remote = node_processes(cfg, addresses, "tcp://10.9.0.1:5000")[-1]
    assert (remote.local, remote.launcher, remote.environ["PS_BIND"]) == (False, "slurm", "10.9.0.2")
    with_secret = node_processes(dataclasses.replace(cfg, secret_file="/tmp/ps-launch-j-x/secret.json"), addresses,
                                 "tcp://10.9.0.1:5000")[-1]
    assert with_secret.environ["PS_SECRET_FILE"] == "/tmp/ps-launch-j-x-on-n2/worker-2.json"  # its agent's own copy


def test_outside_this_node_everything_is_remote():
    cfg = _config({**ALLOCATION, "SLURMD_NODENAME": ""})  # salloc on a login node
    assert not any(cfg.runs_here(h) for h in cfg.layout.hosts())


def test_servers_per_node():
    cfg = _config(ALLOCATION, servers_per_node=2)
    assert [p.host for p in cfg.layout.servers] == ["n1", "n1", "n2", "n2"]
    assert len(_config({}, servers_per_node=3).layout.servers) == 3
    with pytest.raises(ConfigError, match="--servers-per-node"):
        _config({}, servers_per_node=0)


def test_servers_per_node_with_a_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("10.9.0.1 slots=2 servers=3\n10.9.0.2 slots=2\n")
    cfg = _config({}, str(hostfile), servers_per_node=1)
    assert [p.host for p in cfg.layout.servers] == ["10.9.0.1", "10.9.0.2"]


def test_a_hostfile_wins_and_ssh_is_the_default_outside_slurm(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("127.0.0.1 slots=1\n")
    assert _config(ALLOCATION, str(hostfile)).launcher == "ssh"
    assert _config({}).launcher == "ssh"


def test_launcher_slurm_needs_an_allocation():
    with pytest.raises(ConfigError, match="needs a Slurm allocation"):
        _config({}, launcher="slurm")


def test_tasks_must_match_the_nodes():
    with pytest.raises(ConfigError, match="2 nodes"):
        allocation_from_env({**ALLOCATION, "SLURM_TASKS_PER_NODE": "2(x3)"})


TASK = {"SLURM_JOB_ID": "1234", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "4", "SLURMD_NODENAME": "n2"}


def _task(procid, **options):
    options.setdefault("auth", "none")
    return cli.slurm_task_process(("python", "train.py"), (), 30.0, {**TASK, "SLURM_PROCID": str(procid)},
                                  num_servers=1, **options)


def test_from_slurm_roles_by_procid():
    scheduler = _task(0)
    assert scheduler.role == "scheduler"
    assert scheduler.argv[-4:] == ("--bind", "10.9.0.2", "--port", "21234")
    server, worker = _task(1), _task(3)
    assert (server.role, server.rank, worker.role, worker.rank) == ("server", 0, "worker", 1)
    assert worker.argv == ("python", "train.py")
    env = worker.environ
    assert (env["PS_SCHEDULER"], env["PS_BIND"], env["PS_NUM_WORKERS"]) == ("tcp://10.9.0.1:21234", "10.9.0.2", "2")
    assert "PS_SECRET_FILE" not in env and env["PS_JOB_ID"] == "slurm-1234"


def test_from_slurm_refuses_what_cannot_work():
    with pytest.raises(ConfigError, match="--auth none"):
        _task(1, auth="token")
    with pytest.raises(ConfigError, match="needs at least 3"):
        cli.slurm_task_process(("x",), (), 30.0, {**TASK, "SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, auth="none")
    with pytest.raises(ConfigError, match="SLURM_PROCID"):
        cli.slurm_task_process(("x",), (), 30.0, {}, auth="none")
    with pytest.raises(ConfigError, match="not -n 3"):
        _task(2, num_workers=3)
