"""Ending a job's processes (launch/stopping.py, launch/process.py), with real local processes:
stopped ones, ones that ignore SIGTERM, and the scheduler's dead-node lines matched to them."""

from __future__ import annotations

import io
import os
import signal
import sys
import time

import pytest

from psframework.launch.commands import ProcessSpec
from psframework.launch.job import Death, declared_process
from psframework.launch.process import Console, JobProcess
from psframework.launch.stopping import KILL_WAIT, Stopper

pytestmark = pytest.mark.timeout(60)

STOPS_ITSELF = ("sh", "-c", "kill -STOP $$; sleep 60")
DEAF = (sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                              "print('ready', flush=True); time.sleep(60)")


@pytest.fixture
def start():
    started: list[JobProcess] = []

    def run(argv, rank: int = 0) -> JobProcess:
        spec = ProcessSpec(role="worker", rank=rank, host="127.0.0.1", ssh_port=None, local=True,
                           argv=tuple(argv), env=())
        proc = JobProcess(spec, Console(out=io.BytesIO(), err=io.StringIO()))
        started.append(proc)
        proc.start()
        return proc

    yield run
    Stopper(0.0).stop_all(started)
    for proc in started:
        proc.close()


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.02)


def test_a_stopped_process_ends_on_sigterm_without_waiting_for_the_grace(start):
    proc = start(STOPS_ITSELF)
    _wait_for(lambda: proc.state() == "stopped", "stop")
    began = time.monotonic()
    Stopper(grace=30).stop_all([proc])
    assert time.monotonic() - began < 5  # SIGCONT came with the SIGTERM: no 30 s wait for SIGKILL
    assert proc.exit_code() == -signal.SIGTERM and not proc.had_to_be_killed


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace(start):
    proc = start(DEAF)
    _wait_for(lambda: "ready" in proc.last_lines(1), "ready line")
    began = time.monotonic()
    Stopper(grace=0.5).stop_all([proc])
    took = time.monotonic() - began
    assert 0.5 <= took < 0.5 + KILL_WAIT
    assert proc.exit_code() == -signal.SIGKILL and proc.had_to_be_killed


def test_begin_returns_at_once_and_escalate_kills_only_the_overdue(start):
    deaf, stopped = start(DEAF), start(STOPS_ITSELF, rank=1)
    _wait_for(lambda: "ready" in deaf.last_lines(1) and stopped.state() == "stopped", "both ready")
    stopper = Stopper(grace=0.5)
    for proc in (deaf, stopped):
        stopper.begin(proc)
    stopper.escalate()  # nothing is overdue yet
    _wait_for(lambda: not stopped.running(), "the stopped one to end on SIGTERM")
    assert deaf.running() and stopper.ending(deaf) and not stopper.ending(stopped)
    _wait_for(lambda: (stopper.escalate(), not deaf.running())[1], "SIGKILL after the grace")
    assert deaf.had_to_be_killed and not stopped.had_to_be_killed


def test_a_death_is_matched_by_pid_or_process_group(start):
    # two processes of one rank (an old one not gone yet and its successor), each a shell around python
    wrapped = ("sh", "-c", f"{sys.executable} -c 'import os, time; print(os.getpid(), flush=True); "
                           "time.sleep(60)'; true")
    shells = [start(wrapped, rank=1), start(wrapped, rank=1)]
    _wait_for(lambda: all(s.last_lines(1) for s in shells), "the wrapped processes' pids")
    inner = [int(s.last_lines(1)[0]) for s in shells]
    assert inner[0] != shells[0].pid
    for shell, pid in zip(shells, inner):
        assert declared_process(shells, Death("worker", 1, "127.0.0.1", shell.pid, "r")) is shell
        assert declared_process(shells, Death("worker", 1, "127.0.0.1", pid, "r")) is shell  # in its group
    assert declared_process(shells, Death("worker", 0, "127.0.0.1", inner[0], "r")) is None  # another rank


def test_a_death_of_an_ended_process_of_ours_is_not_passed_to_its_successor(start):
    old = start(("true",))
    _wait_for(lambda: not old.running(), "the old one to end")
    new = start(STOPS_ITSELF)
    # a restarted server replaces the old one; the scheduler then declares the old pid dead
    assert declared_process([old, new], Death("worker", 0, "127.0.0.1", old.pid, "replaced")) is None
    assert declared_process([old, new], Death("worker", 0, "127.0.0.1", new.pid, "r")) is new
    # a pid that is none of ours (a command wrapped on another host): the one running process of that rank
    assert declared_process([old, new], Death("worker", 0, "10.0.0.2", 999999, "r")) is new


def test_the_state_of_a_stopped_process_is_read_from_proc(start):
    proc = start(STOPS_ITSELF)
    _wait_for(lambda: proc.state() == "stopped", "stop")
    proc.declare_dead("no heartbeat for 2.0 s")
    os.killpg(proc.pid, signal.SIGCONT)
    _wait_for(lambda: proc.state() != "stopped", "it to run again")
    # the state when it was declared dead is what the report says, not what it does later
    assert proc.death() == "declared dead: no heartbeat for 2.0 s (state: stopped)"
