"""LaunchConfig, the per-process commands and environments, and the click layer (no process started)."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from psframework.launch.cli import build_config, main
from psframework.launch.commands import host_addresses, node_processes, scheduler_process
from psframework.launch.config import LAUNCH_ENV_VARS, RESERVED_VARS, LaunchConfig, parse_exports
from psframework.launch.hostfile import parse_hostfile
from psframework.launch.job import Death, SchedulerWatch
from psframework.launch.process import is_routine
from psframework.config import ENV_VARS
from psframework.errors import ConfigError

README_ENV = Path(__file__).resolve().parents[2] / "launch" / "README_ENV.md"


def _cfg(**kw) -> LaunchConfig:
    kw.setdefault("command", ("python", "train.py"))
    kw.setdefault("python", "/py")
    kw.setdefault("cwd", "/job")
    kw.setdefault("job_id", "j1")
    return LaunchConfig(**kw)


# -- LaunchConfig ------------------------------------------------------------------------

def test_defaults_run_one_worker_and_one_server_here():
    cfg = _cfg()
    assert [(p.role, p.rank, p.host) for p in cfg.layout.all()] == [
        ("scheduler", 0, "127.0.0.1"), ("server", 0, "127.0.0.1"), ("worker", 0, "127.0.0.1")]
    assert cfg.scheduler_config().mode == "sync" and cfg.start_timeout == 60


def test_counts_default_to_the_hostfile_capacity():
    hosts = parse_hostfile("a slots=2 servers=1\nb slots=3 servers=2\n")
    cfg = _cfg(hosts=hosts)
    assert (len(cfg.layout.workers), len(cfg.layout.servers)) == (5, 3)


@pytest.mark.parametrize("kw, message", [
    ({"command": ()}, "no command to run"),
    ({"mode": "fast"}, "mode must be one of"),
    ({"staleness": -1}, "staleness must be >= 0"),
    ({"server_device": "tpu"}, "device must be cpu, cuda or cuda:N"),
    ({"num_workers": 0}, "at least 1"),
    ({"scheduler": "host:99999"}, "bad port"),
    ({"env": (("PS_RANK", "1"),)}, "sets PS_RANK itself"),
    ({"env": (("1BAD", "x"),)}, "not a valid environment variable name"),
    ({"job_id": "a b"}, "job id"),
    ({"stop_grace": -1.0}, "--stop-grace must be"),
    ({"stop_grace": float("nan")}, "--stop-grace must be"),
    ({"stop_grace": float("inf")}, "--stop-grace must be"),
    ({"hosts": parse_hostfile("a slots=1\n", "h.txt"), "hostfile": "h.txt", "num_workers": 2},
     "asked for 2 workers but h.txt offers 1 slots"),
])
def test_bad_input_is_a_config_error(kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        _cfg(**kw)


def test_scheduler_port_comes_from_host_port():
    assert _cfg(scheduler="127.0.0.1:5555").scheduler_port == 5555
    assert _cfg().scheduler_port == 0


def test_exports_take_values_from_the_environment_when_not_given():
    assert parse_exports(("A=1", "B", "C=x=y"), {"B": "from env"}) == (("A", "1"), ("B", "from env"), ("C", "x=y"))
    with pytest.raises(ConfigError, match="MISSING is not set here"):
        parse_exports(("MISSING",), {})


# -- commands ------------------------------------------------------------------------------

def test_local_job_binds_loopback_and_every_process_gets_the_job():
    cfg = _cfg(num_workers=2, num_servers=2, mode="ssp", staleness=1, env=(("PS_TEST", "v"),))
    addresses = host_addresses(cfg)
    assert addresses == {"127.0.0.1": "127.0.0.1"}
    scheduler = scheduler_process(cfg, addresses)
    assert scheduler.argv == ("/py", "-m", "psframework", "scheduler", "--bind", "127.0.0.1")
    assert scheduler.local and "PS_SCHEDULER" not in scheduler.environ
    nodes = node_processes(cfg, addresses, "tcp://127.0.0.1:7000")
    assert [p.name for p in nodes] == ["server 0", "server 1", "worker 0", "worker 1"]
    assert nodes[1].argv == ("/py", "-m", "psframework", "server", "--rank", "1", "--scheduler",
                             "tcp://127.0.0.1:7000", "--bind", "127.0.0.1")
    env = nodes[3].environ
    assert env["PS_ROLE"] == "worker" and env["PS_RANK"] == "1" and env["PS_SCHEDULER"] == "tcp://127.0.0.1:7000"
    job = [env[k] for k in ("PS_NUM_WORKERS", "PS_NUM_SERVERS", "PS_MODE", "PS_STALENESS")]
    assert job == ["2", "2", "ssp", "1"]
    assert env["PS_BIND"] == "127.0.0.1" and env["PS_JOB_ID"] == "j1" and env["PS_TEST"] == "v"
    assert "PYTHONPATH" not in env  # local processes inherit ps-launch's environment anyway


def test_bind_and_scheduler_port_are_used_for_a_local_job():
    cfg = _cfg(bind="127.0.0.2", scheduler="127.0.0.2:6000")
    addresses = host_addresses(cfg)
    assert scheduler_process(cfg, addresses).argv[-4:] == ("--bind", "127.0.0.2", "--port", "6000")


def test_remote_hosts_bind_their_hostfile_address_and_get_forwarded_variables():
    hosts = parse_hostfile("192.0.2.10 slots=1 servers=1\n192.0.2.11 slots=1 servers=1\n")
    cfg = _cfg(hosts=hosts, forward_env=(("PYTHONPATH", "/src"),), env=(("PYTHONPATH", "/mine"),))
    addresses = host_addresses(cfg)
    assert addresses == {"192.0.2.10": "192.0.2.10", "192.0.2.11": "192.0.2.11"}
    worker1 = node_processes(cfg, addresses, "tcp://192.0.2.10:7000")[-1]
    assert not worker1.local and worker1.host == "192.0.2.11"
    assert worker1.environ["PS_BIND"] == worker1.environ["PS_HOST"] == "192.0.2.11"
    assert worker1.environ["PYTHONPATH"] == "/mine"  # -x wins over the forwarded value


def test_a_remote_process_reads_its_own_hosts_copy_of_the_secret():
    hosts = parse_hostfile("127.0.0.1 slots=1 servers=1\n192.0.2.11:2222 slots=1\n")
    cfg = _cfg(hosts=hosts, bind="192.0.2.10", secret_file="/tmp/ps-launch-j1-x/secret.json")
    here, there = node_processes(cfg, host_addresses(cfg), "tcp://192.0.2.10:7000")[-2:]
    assert here.local and here.environ["PS_SECRET_FILE"] == "/tmp/ps-launch-j1-x/secret.json"
    assert there.environ["PS_SECRET_FILE"] == "/tmp/ps-launch-j1-x-on-192.0.2.11-2222/secret.json"


def _worker_threads(cfg: LaunchConfig) -> list:
    return [spec.environ.get("OMP_NUM_THREADS") for spec in node_processes(cfg, host_addresses(cfg), "tcp://x:1")
            if spec.role == "worker"]


def test_workers_share_this_hosts_cores_among_the_jobs_processes():
    # 2 servers + 2 workers on 16 cores: 4 threads each (torch would start 16 in every worker)
    assert _worker_threads(_cfg(num_workers=2, num_servers=2, host_cores=16)) == ["4", "4"]
    assert _worker_threads(_cfg(num_workers=4, num_servers=1, host_cores=2)) == ["1"] * 4
    assert _worker_threads(_cfg(worker_threads=5, num_workers=2, host_cores=16)) == ["5", "5"]
    assert _worker_threads(_cfg(env=(("OMP_NUM_THREADS", "7"),), host_cores=16)) == ["7"]  # -x wins


def test_workers_of_other_hosts_get_one_thread_where_they_share_the_host_as_torchrun_does():
    hosts = parse_hostfile("192.0.2.10 slots=2 servers=1\n192.0.2.11 slots=1\n")
    # host .10 runs a server and two workers; host .11 one worker: its own cores, unknown here
    assert _worker_threads(_cfg(hosts=hosts, host_cores=64)) == ["1", "1", None]


def test_loopback_in_a_multi_host_job_is_refused():
    hosts = parse_hostfile("127.0.0.1 slots=1 servers=1\n192.0.2.11 slots=1\n")
    with pytest.raises(ConfigError, match="loopback"):
        host_addresses(_cfg(hosts=hosts))
    assert host_addresses(_cfg(hosts=hosts, bind="192.0.2.99"))["127.0.0.1"] == "192.0.2.99"


# -- what the scheduler says ------------------------------------------------------------

def test_scheduler_lines_are_understood():
    watch = SchedulerWatch()
    for line in ["PS_SCHEDULER_ADDRESS=tcp://10.0.0.1:4000", "PS_JOINED role=server rank=0 host=10.0.0.1",
                 "2026 scheduler INFO worker from x joined", "PS_JOINED role=worker rank=1 host=10.0.0.2"]:
        watch.on_line(None, line)
    assert watch.address == "tcp://10.0.0.1:4000" and not watch.up.is_set()
    assert watch.joined == [("server", 0, "10.0.0.1"), ("worker", 1, "10.0.0.2")]
    watch.on_line(None, "PS_CLUSTER_UP")
    assert watch.up.is_set()
    assert watch.take_deaths() == []
    watch.on_line(None, "PS_DEAD role=worker rank=2 host=10.0.0.3 pid=4242 reason=no heartbeat for 4.1 s")
    assert watch.take_deaths() == [Death("worker", 2, "10.0.0.3", 4242, "no heartbeat for 4.1 s")]
    assert watch.take_deaths() == []  # each death is taken once


@pytest.mark.parametrize("line, routine", [
    ("2026-12-01 17:36:18,038 scheduler INFO all workers are done; shutting the job down", True),
    ("2026-12-01 17:36:18,538 server DEBUG server 0: block 3 applied", True),
    ("2026-12-01 17:36:18,538 server WARNING server 0: worker 2 did not read its reply", False),
    ("2026-12-01 17:36:18,538 server ERROR server 0: cannot write the checkpoint", False),
    ("PS_SCHEDULER_ADDRESS=tcp://10.0.0.1:4000", True),
    ("PS_CLUSTER_UP", True),
    ("PS_JOINED role=worker rank=1 host=10.0.0.2", True),
    ("Traceback (most recent call last):", False),
    ("loss 0.25 INFO", False),
])
def test_routine_lines_of_the_infrastructure_are_told_apart(line, routine):
    assert is_routine(line) is routine


# -- the click layer ------------------------------------------------------------------------

def _envvars() -> dict[str, str]:
    """Each option's own variable (the first; --worker-threads also reads the shell's OMP_NUM_THREADS)."""
    return {p.envvar if isinstance(p.envvar, str) else p.envvar[0]: p.name
            for p in main.params if isinstance(p, click.Option) and p.envvar}


def test_every_option_has_a_documented_variable():
    assert set(_envvars()) == set(LAUNCH_ENV_VARS)
    table = README_ENV.read_text()
    for name in [*LAUNCH_ENV_VARS, *ENV_VARS, "PS_JOB_ID"]:
        assert f"`{name}`" in table, name
    assert RESERVED_VARS <= set(ENV_VARS) | {"PS_JOB_ID"}


def test_options_fall_back_to_ps_variables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("node1 slots=3 servers=2\n")
    env = {"PS_HOSTFILE": "hosts", "PS_MODE": "async", "PS_STALENESS": "5", "PS_NUM_WORKERS": "2",
           "PS_START_TIMEOUT": "9", "PS_ENV": "A=1 B=2", "PS_JOB_ID": "abc", "PS_LOG_DIR": "logs",
           "PS_STOP_GRACE": "1.5", "PS_VERBOSE": "1", "PS_METRICS_PORT": "0"}
    captured = {}
    monkeypatch.setattr("psframework.launch.cli.run_job", lambda cfg: captured.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(main, ["--", "true"], env=env)
    assert result.exit_code == 0, result.output
    cfg = captured["cfg"]
    assert (cfg.mode, cfg.staleness, len(cfg.layout.workers), len(cfg.layout.servers)) == ("async", 5, 2, 2)
    assert cfg.start_timeout == 9 and cfg.env == (("A", "1"), ("B", "2")) and cfg.job_id == "abc"
    assert cfg.log_dir == "logs" and cfg.cwd == str(tmp_path)
    assert cfg.stop_grace == 1.5 and cfg.verbose
    assert cfg.metrics_port == 0 and cfg.scheduler_config().metrics_port == 0


@pytest.mark.parametrize("env, threads", [({"OMP_NUM_THREADS": "3"}, 3), ({"PS_WORKER_THREADS": "2"}, 2),
                                           ({"PS_WORKER_THREADS": "2", "OMP_NUM_THREADS": "3"}, 2), ({}, None)])
def test_the_launching_shells_omp_num_threads_is_kept_for_the_workers(monkeypatch, env, threads):
    captured = {}
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("psframework.launch.cli.run_job", lambda cfg: captured.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(main, ["-n", "2", "--", "true"], env=env)
    assert result.exit_code == 0, result.output
    assert captured["cfg"].worker_threads == threads
    refused = CliRunner().invoke(main, ["--worker-threads", "0", "--", "true"])
    assert refused.exit_code == 2 and "--worker-threads" in refused.output and "x>=1" in refused.output


def test_worker_arguments_are_not_taken_as_options(monkeypatch):
    captured = {}
    monkeypatch.setattr("psframework.launch.cli.run_job", lambda cfg: captured.setdefault("cfg", cfg) and 0)
    result = CliRunner().invoke(main, ["-n", "1", "python", "train.py", "-n", "5", "--mode", "x"])
    assert result.exit_code == 0, result.output
    assert captured["cfg"].command == ("python", "train.py", "-n", "5", "--mode", "x")


def test_heartbeat_and_chunk_settings_pass_through(monkeypatch):
    monkeypatch.setenv("PS_HEARTBEAT_INTERVAL", "0.25")
    monkeypatch.setenv("PS_CHUNK_BYTES", "1024")
    cfg = build_config(("true",), None, (), 7.0)
    env = node_processes(cfg, host_addresses(cfg), "tcp://127.0.0.1:1")[0].environ
    passed = [env[k] for k in ("PS_HEARTBEAT_INTERVAL", "PS_CHUNK_BYTES", "PS_START_TIMEOUT")]
    assert passed == ["0.25", "1024", "7.0"]


def test_usage_errors_exit_2_and_name_the_problem(tmp_path):
    hostfile = tmp_path / "h.txt"
    hostfile.write_text("node1 slots=1\nnode2 slots=x\n")
    result = CliRunner().invoke(main, ["-H", str(hostfile), "--", "true"])
    assert result.exit_code == 2
    assert f"{hostfile}:2: bad number in 'slots=x'" in result.output
    assert CliRunner().invoke(main, []).exit_code == 2
