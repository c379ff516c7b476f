"""Watching another process of this host through /proc (the check after a peer's CUDA event)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from psframework.datapath.peer_process import PeerProcess, start_time


@pytest.fixture
def child():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_running_or_stopped_process_runs_and_a_killed_one_does_not(child):
    watch = PeerProcess(child.pid, start_time(child.pid))
    assert watch.running()
    child.send_signal(signal.SIGSTOP)  # a stopped process's GPU work still completes
    assert _until(lambda: open(f"/proc/{child.pid}/stat").read().split(") ")[1][0] == "T")
    assert watch.running()
    child.kill()
    assert _until(lambda: not watch.running())  # a zombie until reaped
    child.wait()
    assert not watch.running()
    watch.close()
    assert not watch.running()


def test_a_pid_with_another_start_time_is_not_taken_for_the_peer(child):
    with pytest.raises(OSError, match=f"process {child.pid} .* is not visible from here"):
        PeerProcess(child.pid, start_time(child.pid) + 1)
    assert start_time(2 ** 22 + 7) is None
