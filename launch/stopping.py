"""Ending processes of a job: SIGTERM with SIGCONT, SIGKILL after the grace, every wait with a deadline.

``Stopper.begin(proc)`` asks one process to stop and returns at once (the job's loop goes on
watching the others); ``escalate()``, called every tick, SIGKILLs what outlived its grace;
``stop_all(procs)`` ends everything at the end of a job and returns within the grace plus
``KILL_WAIT`` (plus ``REMOTE_MARGIN`` for remote processes), whatever state the processes are in.

A remote process is ended by its agent on its host (``remote_child``: SIGTERM and SIGCONT, SIGKILL
after the same grace); ps-launch gives it ``REMOTE_MARGIN`` more for the round trip before it
falls back to ``ssh HOST kill -KILL -- -PGID``.
"""

from __future__ import annotations

import subprocess
import time
from typing import Sequence

from .process import JobProcess

TICK = 0.05
KILL_WAIT = 3.0      # for SIGKILL and the ssh kill fallback
REMOTE_MARGIN = 1.0  # ssh carries the stop to the remote agent and its report back


class Stopper:
    """Owns the ending of processes: who was asked to stop, and when each one gets SIGKILL."""

    def __init__(self, grace: float):
        self.grace = grace
        self._kill_at: dict[JobProcess, float] = {}
        self._fallbacks: list[subprocess.Popen] = []  # `ssh HOST kill` clients, reaped in stop_all

    def begin(self, proc: JobProcess) -> None:
        """Ask it to stop now (once); it gets SIGKILL if it is still there after the grace."""
        if proc in self._kill_at or not proc.running():
            return
        proc.terminate()
        margin = 0.0 if proc.spec.local else REMOTE_MARGIN
        self._kill_at[proc] = time.monotonic() + self.grace + margin

    def ending(self, proc: JobProcess) -> bool:
        """Asked to stop and not gone yet."""
        return proc in self._kill_at and proc.running()

    def escalate(self) -> None:
        """SIGKILL every process that outlived its grace."""
        now = time.monotonic()
        for proc, kill_at in self._kill_at.items():
            if now >= kill_at and proc.running():
                fallback = proc.kill()
                if fallback is not None:
                    self._fallbacks.append(fallback)
                self._kill_at[proc] = float("inf")  # once is enough

    def stop_all(self, procs: Sequence[JobProcess]) -> None:
        """End every process that still runs; returns once all are gone or their deadlines passed."""
        for proc in procs:
            self.begin(proc)
        live = [p for p in procs if p.running()]
        last_kill = max((self._kill_at[p] for p in live if self._kill_at[p] != float("inf")), default=time.monotonic())
        deadline = last_kill + KILL_WAIT
        while any(p.running() for p in live) and time.monotonic() < deadline:
            self.escalate()
            time.sleep(TICK)
        for ssh in self._fallbacks:
            _reap(ssh, deadline)
        self._fallbacks.clear()


def _reap(proc: subprocess.Popen, deadline: float) -> None:
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass  # an ssh client that survives SIGKILL: nothing more we can do, and not worth a hang


__all__ = ["KILL_WAIT", "REMOTE_MARGIN", "TICK", "Stopper"]
