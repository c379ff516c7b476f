"""Whether a process of this host still runs, from ``/proc``: for the waits on another process's CUDA events.

A process killed with device work in flight has its CUDA context torn down as it exits, and an
interprocess event it recorded then reads as complete although the work before it never ran. So
a completed event of a peer says only that its work is done *or* that the peer is going: the
waiter then asks whether the peer still runs and is not exiting (the kernel marks a process as
exiting before it closes its files, the GPU's among them). The peer is known by its pid and its
start time, so a pid that was reused, or one seen through another pid namespace, is never
mistaken for it.
"""

from __future__ import annotations

import os
from typing import Optional

PF_EXITING = 0x4  # the kernel's flag of a process in exit (include/linux/sched.h)


def _fields(text: bytes) -> list[bytes]:
    """The fields of ``/proc/PID/stat`` after the command name (which may hold spaces)."""
    return text[text.rindex(b")") + 2:].split()


def start_time(pid: int) -> Optional[int]:
    """When ``pid`` started, in clock ticks since boot (None if there is no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return int(_fields(stat.read())[19])
    except (OSError, ValueError, IndexError):
        return None


class PeerProcess:
    """Another process of this host, watched through an open ``/proc/PID/stat``."""

    def __init__(self, pid: int, started: int):
        if started is None or start_time(pid) != started:
            raise OSError(f"process {pid} (started at tick {started}) is not visible from here")
        self.pid = pid
        self._fd: Optional[int] = os.open(f"/proc/{pid}/stat", os.O_RDONLY)

    def running(self) -> bool:
        """It runs and is not exiting (False once it is gone, a zombie, or in exit)."""
        if self._fd is None:
            return False
        try:
            fields = _fields(os.pread(self._fd, 1024, 0))
        except (OSError, ValueError):
            return False  # ESRCH: the process is gone
        return fields[0] not in (b"Z", b"X", b"x") and not int(fields[6]) & PF_EXITING

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


__all__ = ["PF_EXITING", "PeerProcess", "start_time"]
