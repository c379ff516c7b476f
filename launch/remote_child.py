"""``python -m psframework.launch.remote_child [--grace S] [--secret-file PATH] -- COMMAND [ARGS]...``: ps-launch's
agent on a remote host.

ps-launch runs this over ssh with a pipe as the ssh client's stdin, and never writes to it. sshd
does not stop a command without a terminal when the client goes away, so this wrapper does: it
runs COMMAND in a process group of its own and, when its stdin reaches end-of-file (ps-launch
closed the pipe, died, or the connection dropped) or it gets SIGTERM/SIGHUP/SIGINT, it sends the
group SIGTERM and SIGCONT (a stopped process sees a SIGTERM only once it runs again), then SIGKILL
after ``--grace`` seconds. When COMMAND exits by itself, whatever it left in its group is killed
too, so nothing of the job outlives it.

It tells ps-launch, on stdout (which COMMAND's output shares)::

    PS_REMOTE_CHILD pgid=4242     once COMMAND started (for ``ssh HOST kill -- -4242`` as a fallback)
    PS_REMOTE_CHILD state=stopped when asked to stop it: what COMMAND was doing (``process_state``)
    PS_REMOTE_CHILD exit=-9       when COMMAND ended: its exit code, or minus the signal that killed it

and exits with COMMAND's exit code (128 + N for signal N). This module imports only the standard
library so that it starts in milliseconds.

With ``--secret-file PATH`` (under Slurm) the first line on stdin is the job secret: the agent
writes it to PATH (readable by the user only) before it starts COMMAND, and removes it, and its
directory once empty, when COMMAND has ended; so the copy goes with the process, also after
``scancel``, when no new job step could remove it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import signal
import subprocess
import sys
from typing import Optional, Sequence

MARKER = "PS_REMOTE_CHILD"
DEFAULT_GRACE = 2.0
_TICK = 0.1
_PR_SET_PDEATHSIG = 1
# the state letters of /proc/PID/stat, as words for reports
_STATES = {"R": "running", "S": "sleeping", "D": "uninterruptible", "T": "stopped", "t": "traced",
           "Z": "zombie", "X": "dead", "I": "idle"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        grace, secret_file, command = parse_args(list(sys.argv[1:] if argv is None else argv))
    except ValueError as exc:
        print(f"remote_child: {exc}", file=sys.stderr, flush=True)
        return 2
    if secret_file is None:
        return run(command, grace)
    try:
        try:
            _write_secret(secret_file, _read_line(0))
        except (OSError, ValueError) as exc:
            print(f"remote_child: cannot write the job secret to {secret_file}: {exc}", flush=True)
            tell("exit=127")
            return 127
        return run(command, grace)
    finally:
        _remove_secret(secret_file)


def run(command: list[str], grace: float) -> int:
    stop_requested = _install_stop_handlers()
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                 start_new_session=True, preexec_fn=_die_with_parent)
    except OSError as exc:
        print(f"remote_child: cannot run {command[0]!r}: {exc}", flush=True)
        tell("exit=127")
        return 127
    tell(f"pgid={child.pid}")
    code = supervise(child, grace, stop_requested)
    tell(f"exit={code}")
    return code if code >= 0 else 128 - code


def parse_args(args: list[str]) -> tuple[float, Optional[str], list[str]]:
    grace, secret_file = DEFAULT_GRACE, None
    while args[:1] in (["--grace"], ["--secret-file"]) and len(args) >= 2:
        if args[0] == "--grace":
            grace = float(args[1])
        else:
            secret_file = args[1]
        args = args[2:]
    if args[:1] == ["--"]:
        args = args[1:]
    if not args:
        raise ValueError("usage: python -m psframework.launch.remote_child [--grace S] [--secret-file PATH] "
                         "-- COMMAND [ARGS]...")
    return grace, secret_file, args


def supervise(child: subprocess.Popen, grace: float, stop_requested: list[int]) -> int:
    """Wait for the child; stop its group if stdin closes or a stop signal arrives. Returns its code."""
    while child.poll() is None:
        if stop_requested or not _stdin_still_open(_TICK):
            return stop_group(child, grace)
    _kill_group(child.pid, signal.SIGKILL)  # leftovers of a child that exited by itself
    return child.returncode


def stop_group(child: subprocess.Popen, grace: float) -> int:
    tell(f"state={process_state(child.pid)}")
    terminate_group(child.pid)
    try:
        child.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    _kill_group(child.pid, signal.SIGKILL)
    return child.wait()


def tell(message: str) -> None:
    """A line for ps-launch; a broken pipe only means ps-launch is gone, which we handle anyway."""
    try:
        sys.stdout.write(f"{MARKER} {message}\n")
        sys.stdout.flush()
    except (OSError, ValueError):
        pass


def terminate_group(pgid: int) -> None:
    """SIGTERM, then SIGCONT: a stopped process (kill -STOP, a debugger, a frozen machine) would
    otherwise hold the SIGTERM pending until someone continues it."""
    _kill_group(pgid, signal.SIGTERM)
    _kill_group(pgid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """What a process of this host is doing, from ``/proc/PID/stat``: ``stopped``, ``running``,
    ``sleeping``, ...; ``gone`` once it was reaped, ``unknown`` where there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except FileNotFoundError:
        return "gone" if os.path.isdir("/proc/self") else "unknown"
    except OSError:
        return "unknown"
    fields = stat.rsplit(")", 1)[-1].split()  # the command name may hold spaces and parentheses
    return _STATES.get(fields[0], fields[0]) if fields else "unknown"


def _read_line(fd: int) -> bytes:
    """One line from ``fd``, read without a buffer that could hold back the end-of-file we wait for later."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            raise ValueError("stdin ended before the job secret's line")
        data += chunk
    return data


def _write_secret(path: str, line: bytes) -> None:
    os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(line)


def _remove_secret(path: str) -> None:
    for remove, target in ((os.remove, path), (os.rmdir, os.path.dirname(path))):
        try:
            remove(target)
        except OSError:
            pass  # gone already, or the directory still holds the copy of another process of this host


def _stdin_still_open(timeout: float) -> bool:
    try:
        readable, _, _ = select.select([0], [], [], timeout)
        # ps-launch never writes, so readable means end-of-file (or data we ignore)
        return not readable or os.read(0, 4096) != b""
    except (OSError, ValueError):
        return False


def _install_stop_handlers() -> list[int]:
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _die_with_parent() -> None:  # in the child between fork and exec
    # Duplicates psframework.procs on purpose: importing psframework would import torch (seconds).
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
