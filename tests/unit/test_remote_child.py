"""psframework.launch.remote_child, run locally: it passes exit codes through and stops the whole process group
when its stdin closes (what happens when ps-launch or the ssh connection goes away)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from psframework.launch.remote_child import MARKER, parse_args

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(30)


def _start(*command: str, grace: float = 1) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "psframework.launch.remote_child", "--grace", str(grace), "--",
                             *command],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env, text=True)


def _markers(out: str) -> dict[str, int | str]:
    pairs = [line[len(MARKER) + 1:].split("=") for line in out.splitlines() if line.startswith(MARKER + " ")]
    return {key: int(value) if value.lstrip("-").isdigit() else value for key, value in pairs}


def _state(pid: int) -> str:
    """The state letter in /proc/PID/stat (T: stopped, Z: zombie); empty once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    return _state(pid) not in ("", "Z")


def _finish(p: subprocess.Popen) -> str:
    """Its output and exit, keeping its stdin open (communicate() would close it: a stop request)."""
    out = p.stdout.read()
    p.wait(timeout=10)
    return out


@pytest.fixture
def procs():
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_exit_code_and_output_pass_through(procs):
    procs.append(p := _start("sh", "-c", "echo out; echo err >&2; exit 3"))
    out = _finish(p)
    assert p.returncode == 3
    assert "out\n" in out and "err\n" in out
    assert _markers(out)["exit"] == 3


def test_death_by_signal_is_reported(procs):
    procs.append(p := _start("sh", "-c", "kill -9 $$"))
    out = _finish(p)
    assert _markers(out)["exit"] == -9
    assert p.returncode == 128 + 9


def test_stdin_eof_stops_the_whole_group(procs, tmp_path):
    pids = tmp_path / "pids"
    # the child and a grandchild that ignores SIGTERM: both must go
    script = f"trap '' TERM; sleep 60 & echo $$ $! > {pids}; wait"
    procs.append(p := _start("sh", "-c", script))
    deadline = time.monotonic() + 10
    while not (pids.exists() and pids.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.02)
    child, grandchild = map(int, pids.read_text().split())
    p.stdin.close()
    out = _finish(p)
    assert _markers(out)["pgid"] == child
    assert not _alive(child) and not _alive(grandchild)


def test_sigterm_to_the_wrapper_stops_the_child(procs, tmp_path):
    procs.append(p := _start("sleep", "60"))
    time.sleep(0.3)
    p.terminate()
    out = _finish(p)
    assert _markers(out)["exit"] == -15


def test_a_stopped_child_is_continued_so_that_sigterm_reaches_it(procs):
    # a long grace: without SIGCONT the stopped child would go only with the SIGKILL 30 s later
    procs.append(p := _start("sh", "-c", "echo ready; kill -STOP $$; sleep 60", grace=30))
    first = [p.stdout.readline() for _ in range(2)]
    child = int(next(line for line in first if line.startswith(MARKER)).split("=")[1])
    deadline = time.monotonic() + 10
    while _state(child) != "T":
        assert time.monotonic() < deadline, f"child {child} never stopped: state {_state(child)!r}"
        time.sleep(0.02)
    p.stdin.close()
    out = _finish(p)
    assert _markers(out)["exit"] == -15  # SIGTERM reached it, no SIGKILL needed
    assert _markers(out)["state"] == "stopped"  # what it was doing when asked to stop


def test_missing_command_reports_127(procs):
    procs.append(p := _start("/nonexistent/program"))
    out = _finish(p)
    assert p.returncode == 127 and "cannot run" in out


def test_arguments():
    assert parse_args(["--grace", "0.5", "--", "a", "--grace"]) == (0.5, None, ["a", "--grace"])
    assert parse_args(["cmd"]) == (2.0, None, ["cmd"])
    assert parse_args(["--grace", "1", "--secret-file", "/s/x.json", "--", "a"]) == (1.0, "/s/x.json", ["a"])
    with pytest.raises(ValueError):
        parse_args(["--"])


def test_secret_file_lives_as_long_as_the_command(tmp_path):
    secret = tmp_path / "job-x-on-n2" / "worker-1.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = f"import os, stat; s = os.stat({str(secret)!r}); print(oct(s.st_mode & 0o777), open({str(secret)!r}).read())"
    p = subprocess.Popen([sys.executable, "-m", "psframework.launch.remote_child", "--secret-file", str(secret), "--",
                          sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env=env, text=True)
    p.stdin.write('{"token": "t"}\n')
    p.stdin.flush()
    out = _finish(p)
    p.stdin.close()
    assert '0o600 {"token": "t"}' in out, out
    assert p.returncode == 0 and not secret.exists() and not secret.parent.exists()


def test_no_secret_line_is_reported():
    p = subprocess.run([sys.executable, "-m", "psframework.launch.remote_child", "--secret-file", "/nonexistent/x",
                        "--", "true"], input="", capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
                       timeout=20)
    assert p.returncode == 127 and "cannot write the job secret" in p.stdout
