"""ps-launch on this host: real jobs, real processes, nothing left behind.

Each test runs ``python -m psframework.launch ...`` and checks what the job wrote, what ps-launch printed, its
exit code, and (through the PS_JOB_ID marker in /proc/*/environ) that no process of the job is
left. Ports are always chosen by the processes themselves.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from psframework.launch.cli import main as cli_main
from tests.integration.launch_helpers import (TRAIN_SCRIPT, Launch, assert_no_leftovers, reference_params,
                                              root_cause_block)

pytestmark = pytest.mark.timeout(90)

PY = sys.executable
# a worker that never joins the cluster: enough to test stopping, without importing torch
SLEEPER = [PY, "-c", "import os, time; print('ready', os.getpid(), flush=True); time.sleep(120)"]
DEAF = [PY, "-c", "import os, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                  "print('ready', os.getpid(), flush=True); time.sleep(120)"]


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


def test_sync_training_job(launch, tmp_path, monkeypatch):
    for chosen in ("OMP_NUM_THREADS", "PS_WORKER_THREADS"):  # the shell's would choose the workers' threads
        monkeypatch.delenv(chosen, raising=False)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    run = launch("-n", "2", "-s", "2", "--mode", "sync", "--server-device", "cpu", "--log-dir", str(logs),
                 "-x", "PS_TEST_GIVEN=a b'c", "-x", "PS_TEST_INHERITED",
                 "--", PY, str(TRAIN_SCRIPT), str(out),
                 # a PS_* variable of the shell reaches no child unless forwarded with -x
                 env={"PS_TEST_INHERITED": "from-env", "PS_TEST_STRAY": "from-shell"})
    result = run.wait(timeout=60)
    assert result.returncode == 0, result.stderr

    params = [torch.load(out / f"worker-{r}.pt") for r in range(2)]
    reference = reference_params()
    for name, value in reference.items():
        assert torch.equal(params[0][name], params[1][name]), name
        assert torch.allclose(params[0][name], value, atol=1e-6), (name, params[0][name], value)

    infos = [json.loads((out / f"worker-{r}.json").read_text()) for r in range(2)]
    for rank, info in enumerate(infos):
        assert info["rank"] == rank and info["role"] == "worker"
        assert info["bind"] == "127.0.0.1"
        assert info["test_env"] == {"PS_TEST_GIVEN": "a b'c", "PS_TEST_INHERITED": "from-env"}
        assert info["threads"] == max(1, os.cpu_count() // 4)  # the host's cores shared by 2 servers, 2 workers

    # quiet by default: the workers' output; the infrastructure's INFO lines only in the log files
    # (its warnings still show: on a shared machine a stranger's process may knock on a server's port)
    infra = [line for line in result.stdout.splitlines() if line.startswith(("[scheduler]", "[server"))]
    assert not [line for line in infra if not re.search(r" (WARNING|ERROR|CRITICAL) ", line)], result.stdout
    for rank in range(2):
        assert f"[worker {rank}] worker {rank} step 4 loss" in result.stdout
        assert f"server {rank} serving on tcp://127.0.0.1:" in (logs / f"server-{rank}.log").read_text()
    assert "PS_SCHEDULER_ADDRESS=tcp://127.0.0.1:" in (logs / "scheduler.log").read_text()
    up = [line for line in result.stderr.splitlines() if "job up in" in line]
    assert len(up) == 1 and "2 workers, 2 servers (shards on cpu), sync; scheduler tcp://127.0.0.1:" in up[0], \
        result.stderr
    assert re.search(r"job finished in [0-9.]+ s: all 2 workers exited 0; 5 steps, [0-9.]+ MB through the servers; "
                     r"exit status: scheduler 0, servers 0 0, workers 0 0", result.stderr), result.stderr
    for name in ("scheduler", "server-0", "server-1", "worker-0", "worker-1"):
        assert (logs / f"{name}.log").stat().st_size > 0, name
    worker_log = (logs / "worker-1.log").read_text()
    assert "worker 1 step 4 loss" in worker_log and "[worker" not in worker_log
    assert_no_leftovers(run.job_id)


def test_verbose_shows_the_infrastructure_lines_and_metrics_are_announced(launch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = launch("-n", "1", "-s", "1", "--server-device", "cpu", "--verbose", "--metrics-port", "0", "--",
                    PY, str(TRAIN_SCRIPT), str(out)).wait(timeout=60)
    assert result.returncode == 0, result.stderr
    up = next(line for line in result.stderr.splitlines() if "job up in" in line)
    assert re.search(r"; metrics http://127\.0\.0\.1:\d+/metrics", up), up
    assert "[scheduler] PS_SCHEDULER_ADDRESS=tcp://127.0.0.1:" in result.stdout
    assert "[server 0] " in result.stdout and " INFO server 0 serving on tcp://" in result.stdout


def test_trace_merges_every_process_into_one_timeline(launch, tmp_path):
    out, traces = tmp_path / "out", tmp_path / "traces"
    out.mkdir()
    result = launch("-n", "2", "-s", "2", "--server-device", "cpu", "--trace", str(traces), "--trace-steps", "1:3",
                    "--", PY, str(TRAIN_SCRIPT), str(out)).wait(timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"trace of 5 processes: {traces / 'trace.json'}" in result.stderr
    events = json.loads((traces / "trace.json").read_text())["traceEvents"]
    tracks = {e["pid"]: e["args"]["name"] for e in events if e["name"] == "process_name"}
    assert sorted(tracks.values()) == ["scheduler 0", "server 0", "server 1", "worker 0", "worker 1"]
    spans: dict[str, list] = {}
    for e in events:
        if e["ph"] == "X":
            spans.setdefault(tracks[e["pid"]], []).append(e)
    for worker in ("worker 0", "worker 1"):
        steps = {e["args"]["step"] for e in spans[worker] if e["cat"] == "exchange"}
        assert steps == {1, 2}, (worker, steps)  # --trace-steps 1:3
        assert {e["cat"] for e in spans[worker]} >= {"exchange", "request", "wait"}
    for server in ("server 0", "server 1"):
        assert {e["cat"] for e in spans[server]} >= {"request", "apply", "answer"}
        assert all(e["dur"] >= 0 and e["ts"] > 0 for e in spans[server])
    assert any(e["ph"] == "i" and e["name"] == "cluster up" for e in events)


def test_failing_worker_is_reported_as_the_root_cause(launch, tmp_path):
    run = launch("-n", "2", "-s", "1", "--server-device", "cpu", "--",
                 PY, str(TRAIN_SCRIPT), str(tmp_path), "--fail-rank", "1", "--fail-step", "2", "--fail-code", "3")
    run.wait_for_output("[worker 1] worker 1: failing on purpose", timeout=60)
    failed_at = time.monotonic()
    result = run.wait(timeout=30)
    assert time.monotonic() - failed_at < 10
    assert result.returncode == 1, result.stderr
    headline = next(line for line in result.stderr.splitlines() if "job failed" in line)
    assert "worker 1" in headline and "exit code 3" in headline
    report = root_cause_block(result.stderr)
    assert report[0].startswith("ps-launch: ROOT CAUSE: worker 1 (host 127.0.0.1, pid ")
    assert report[0].endswith("exit code 3")
    assert any("| worker 1: failing on purpose at step 2" in line for line in report[1:23])
    assert_no_leftovers(run.job_id)


def test_worker_killed_by_sigkill(launch):
    run = launch("-n", "2", "-s", "1", "--server-device", "cpu", "--", *SLEEPER)
    run.wait_for_output("[worker 1] ready ", timeout=45)
    pid = int(run.stdout().split("[worker 1] ready ")[1].split()[0])
    os.kill(pid, signal.SIGKILL)
    killed_at = time.monotonic()
    result = run.wait(timeout=30)
    assert time.monotonic() - killed_at < 10
    assert result.returncode == 1
    report = root_cause_block(result.stderr)
    assert report[0] == f"ps-launch: ROOT CAUSE: worker 1 (host 127.0.0.1, pid {pid}): killed by SIGKILL"
    assert "worker 0 on 127.0.0.1: stopped by ps-launch" in result.stderr
    assert_no_leftovers(run.job_id)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_the_whole_job(launch, sig):
    run = launch("-n", "1", "-s", "1", "--server-device", "cpu", "--", *SLEEPER)
    run.wait_for_output("[worker 0] ready", timeout=45)
    run.proc.send_signal(sig)
    result = run.wait(timeout=15)
    assert result.returncode == 128 + sig
    assert f"got {sig.name}; stopping the job" in result.stderr
    assert "stopped 3 processes: scheduler, server 0, worker 0" in result.stderr
    assert_no_leftovers(run.job_id)


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace(launch):
    run = launch("-n", "1", "-s", "1", "--server-device", "cpu", "--stop-grace", "1", "--", *DEAF)
    run.wait_for_output("[worker 0] ready ", timeout=45)
    pid = int(run.stdout().split("[worker 0] ready ")[1].split()[0])
    run.proc.send_signal(signal.SIGINT)
    stopped_at = time.monotonic()
    result = run.wait(timeout=15)
    assert time.monotonic() - stopped_at < 2.5, result.stderr  # 1 s of grace, not the default 3
    assert result.returncode == 130
    assert f"killed after the 1 s grace: worker 0 (host 127.0.0.1, pid {pid})" in result.stderr
    assert_no_leftovers(run.job_id)


def test_start_timeout_names_what_never_registered(launch):
    run = launch("-n", "2", "-s", "1", "--server-device", "cpu", "--start-timeout", "3", "--", *SLEEPER)
    result = run.wait(timeout=30)
    assert result.returncode == 1
    assert result.elapsed < 15
    assert "the cluster did not come up within 3 s" in result.stderr
    missing = next(line for line in result.stderr.splitlines() if "never registered" in line)
    assert "worker 0 on 127.0.0.1 (" in missing and "worker 1 on 127.0.0.1 (" in missing
    if "PS_SCHEDULER_ADDRESS=" in result.stdout:  # on a very loaded machine it may not get that far
        assert "worker 0 on 127.0.0.1 (still running), worker 1 on 127.0.0.1 (still running)" in missing
    assert_no_leftovers(run.job_id)


def test_usage_error_exits_2(launch):
    result = launch("--mode", "fast", "--", PY, "-c", "pass").wait(timeout=30)
    assert result.returncode == 2
    assert "--mode" in result.stderr and "'fast'" in result.stderr


@pytest.mark.parametrize("hostfile, args, message", [
    ("node1 slots=2\nnode2 slot=2\n", [], "hosts.txt:2: unknown key 'slot'"),
    ("node1 slots=2\nnode2 slots=1\n", ["-n", "4"], "asked for 4 workers but"),
    (None, ["-x", "PS_RANK=3"], "ps-launch sets PS_RANK itself"),
    (None, ["--staleness", "-1"], "staleness must be >= 0"),
    (None, ["--start-timeout", "0"], "start timeout must be > 0"),
    (None, ["--stop-grace", "-1"], "--stop-grace must be"),
], ids=["bad-hostfile-line", "too-many-workers", "reserved-export", "bad-staleness", "bad-timeout", "bad-grace"])
def test_usage_errors(tmp_path, monkeypatch, hostfile, args, message):
    # in-process (CliRunner): the same click command, without a process start per case
    monkeypatch.chdir(tmp_path)
    if hostfile is not None:
        (tmp_path / "hosts.txt").write_text(hostfile)
        args = ["-H", "hosts.txt", *args]
    result = CliRunner().invoke(cli_main, [*args, "--", "true"], prog_name="ps-launch")
    assert result.exit_code == 2, result.output
    assert message in result.output
