"""Child processes with an owner: started so they cannot outlive us, stopped in order.

Every child gets PR_SET_PDEATHSIG (Linux), so if its parent dies for any reason, SIGKILL
included, the kernel kills it too; ``stop_all`` sends SIGTERM, waits, then SIGKILLs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import subprocess
import sys
import time
from typing import IO, Mapping, Optional, Sequence, Union

from .config import host_environment

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def spawn(argv: Sequence[str], env: Optional[Mapping[str, str]] = None, *, stdout: Optional[IO] = None,
          stderr: Optional[IO] = None, cwd: Optional[str] = None, new_session: bool = False,
          stdin: Union[int, IO, None] = subprocess.DEVNULL) -> subprocess.Popen:
    """Start a child that dies with this process (Linux). Its environment is this host's without
    any ``PS_*`` variable (``config.host_environment``), plus ``env``."""
    full_env = host_environment()
    full_env.update(env or {})
    return subprocess.Popen(
        list(argv), env=full_env, stdout=stdout, stderr=stderr, cwd=cwd, stdin=stdin,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        start_new_session=new_session,
    )


def stop_all(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """SIGTERM every live child, wait up to ``grace`` seconds, then SIGKILL the rest."""
    live = [p for p in procs if p.poll() is None]
    for p in live:
        _signal(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal(p, signal.SIGKILL)
            p.wait(timeout=5)


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except ProcessLookupError:
        pass


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def exit_description(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
