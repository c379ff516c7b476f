"""One process of a job, here or on another host, and the thread that carries its output.

A local process runs in a session of its own, so ps-launch can signal its whole process group
and a Ctrl-C in the terminal reaches only ps-launch, which then stops the job in order. A remote
process is an ssh client (or, under Slurm, an srun client) running ``psframework.launch.remote_child`` there; closing the client's stdin stops
it (see that module). Either way the child dies with ps-launch (``procs.spawn``), and a request to
stop is a SIGTERM with a SIGCONT, so that a stopped process ends too.

Each process's stdout and stderr go to one pipe, read line by line by a reader thread that this
object owns: it echoes ``[worker 1] line`` to the console, appends the raw line to the log file
and keeps the last lines for the failure report. A quiet process (the scheduler and the servers,
unless ``--verbose``) keeps its INFO lines and its lines for ps-launch out of the console: the
terminal shows the workers' output and the infrastructure's warnings and errors.
"""

from __future__ import annotations

import collections
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Callable, Optional

from .commands import ProcessSpec
from .remote import kill_group_script, ssh_argv, ssh_kill_argv
from .slurm import srun_argv, srun_script_argv
from .remote_child import MARKER, process_state, terminate_group
from ..procs import exit_description, spawn

TAIL_LINES = 200
# psframework's own log format (psframework/__main__.py) at DEBUG or INFO, and the scheduler's lines for ps-launch
_ROUTINE_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} \S+ (DEBUG|INFO) |PS_[A-Z_]+(=| |$))")


def is_routine(text: str) -> bool:
    """Whether a line of the scheduler or a server is routine: shown on the console only with --verbose."""
    return _ROUTINE_LINE.match(text) is not None

OUTPUT_JOIN_TIMEOUT = 2.0  # for the rest of a pipe after its process ended


class Console:
    """Shows every process's output, one whole line at a time, and ps-launch's own messages."""

    def __init__(self, out: Optional[IO[bytes]] = None, err: Optional[IO[str]] = None):
        self._out = out if out is not None else sys.stdout.buffer
        self._err = err if err is not None else sys.stderr
        self._lock = threading.Lock()

    def line(self, prefix: bytes, raw: bytes) -> None:
        if not raw.endswith(b"\n"):
            raw += b"\n"
        with self._lock:
            try:
                self._out.write(prefix + raw)
                self._out.flush()
            except (OSError, ValueError):
                pass  # nobody is reading our stdout any more; the job goes on, logs still work

    def message(self, text: str) -> None:
        with self._lock:
            try:
                for line in text.splitlines() or [""]:
                    self._err.write(f"ps-launch: {line}\n")
                self._err.flush()
            except (OSError, ValueError):
                pass


class JobProcess:
    """A started (or failed-to-start) process of the job. Used from the job's thread; the reader
    thread only appends lines and records remote_child's markers."""

    def __init__(self, spec: ProcessSpec, console: Console, *, log_dir: Optional[Path] = None,
                 ssh_config: Optional[str] = None, cwd: str = ".", python: str = sys.executable,
                 stop_grace: float = 3.0, on_line: Optional[Callable[["JobProcess", str], None]] = None,
                 quiet: bool = False, slurm_job: Optional[str] = None, secret: Optional[bytes] = None):
        self.spec = spec
        self.slurm_job = slurm_job  # the allocation whose steps run it, when spec.launcher is slurm
        self.secret = secret  # for its agent to write (and remove) under Slurm: a line on its stdin
        self.console = console
        self.log_dir = log_dir
        self.ssh_config = ssh_config
        self.cwd = cwd
        self.python = python
        self.stop_grace = stop_grace  # for a remote one: its agent's SIGTERM -> SIGKILL
        self.on_line = on_line
        self.quiet = quiet  # routine lines to the log file only (is_routine)
        self.popen: Optional[subprocess.Popen] = None
        self.start_error: Optional[str] = None
        self.stopped_by_launcher = False
        self.remote_pgid: Optional[int] = None
        self.remote_exit: Optional[int] = None
        self.remote_state: Optional[str] = None  # what it was doing when its agent was asked to stop it
        self.dead_reason: Optional[str] = None  # the scheduler declared it dead, for this reason
        self._dead_state: Optional[str] = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._tail_lock = threading.Lock()
        self._prefix = f"[{spec.name}] ".encode()
        self._reader: Optional[threading.Thread] = None
        self._log: Optional[IO[bytes]] = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> Optional[int]:
        """The process's pid on its host (for a remote one, once remote_child reported it)."""
        if self.spec.local:
            return self.popen.pid if self.popen else None
        return self.remote_pgid

    def where(self) -> str:
        pid = f", pid {self.pid}" if self.pid else ""
        return f"{self.name} (host {self.spec.host}{pid})"

    # -- starting ------------------------------------------------------------------------

    def start(self) -> None:
        """Start it; a failure to start is recorded in ``start_error`` rather than raised."""
        try:
            self._log = self._open_log()
            argv, env = self._argv_env()
            self.popen = spawn(argv, env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, new_session=True,
                               stdin=subprocess.DEVNULL if self.spec.local else subprocess.PIPE)
            if self.secret is not None:
                self.popen.stdin.write(self.secret.rstrip(b"\n") + b"\n")
                self.popen.stdin.flush()
        except OSError as exc:
            self.start_error = f"could not start: {exc}"
            self._keep(self.start_error)
            _close_quietly(self._log)
            return
        self._reader = threading.Thread(target=self._read_output, name=f"ps-launch-output-{self.spec.log_name}",
                                        daemon=True)
        self._reader.start()

    def _argv_env(self) -> tuple[list[str], dict[str, str]]:
        if self.spec.local:
            return list(self.spec.argv), self.spec.environ
        wrapped = [self.python, "-m", "psframework.launch.remote_child", "--grace", f"{self.stop_grace:g}", "--",
                   *self.spec.argv]
        if self.spec.launcher == "slurm":
            if self.secret is not None:
                wrapped[3:3] = ["--secret-file", self.spec.environ["PS_SECRET_FILE"]]
            # srun passes its environment on to the step: this host's, plus the job's (spawn merges them)
            return srun_argv(self.slurm_job, self.spec.host, wrapped, self.cwd), self.spec.environ
        # the ssh client carries the job id too, so that anything of the job can be found by it
        return ssh_argv(self.spec.host, self.spec.ssh_port, wrapped, self.spec.environ, self.cwd,
                        self.ssh_config), {"PS_JOB_ID": self.spec.environ.get("PS_JOB_ID", "")}

    def _open_log(self) -> Optional[IO[bytes]]:
        if self.log_dir is None:
            return None
        return open(self.log_dir / f"{self.spec.log_name}.log", "wb", buffering=0)

    # -- output --------------------------------------------------------------------------

    def _read_output(self) -> None:
        try:
            for raw in iter(self.popen.stdout.readline, b""):
                self._take_line(raw)
        except (OSError, ValueError):
            pass  # the pipe was closed under us while stopping
        finally:
            if self._log is not None:
                self._log.close()

    def _take_line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r\n")
        if not self.spec.local and text.startswith(MARKER + " "):
            self._remote_marker(text[len(MARKER) + 1:])
            return
        self._keep(text)
        if self._log is not None:
            self._log.write(raw if raw.endswith(b"\n") else raw + b"\n")
        if not (self.quiet and is_routine(text)):
            self.console.line(self._prefix, raw)
        if self.on_line is not None:
            self.on_line(self, text)

    def _keep(self, text: str) -> None:
        with self._tail_lock:
            self._tail.append(text)

    def last_lines(self, count: int) -> list[str]:
        """The last ``count`` lines it printed (the reader thread may still be adding more)."""
        with self._tail_lock:
            return list(self._tail)[-count:]

    def _remote_marker(self, text: str) -> None:
        key, _, value = text.partition("=")
        if key == "state":
            self.remote_state = value.strip()
        elif value.lstrip("-").isdigit():
            if key == "pgid":
                self.remote_pgid = int(value)
            elif key == "exit":
                self.remote_exit = int(value)

    # -- state ---------------------------------------------------------------------------

    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def state(self) -> str:
        """What it is doing now (``stopped``, ``running``, ...); for a remote one, what its agent saw
        when asked to stop it, else ``unknown``."""
        if not self.spec.local:
            return self.remote_state or "unknown"
        return process_state(self.popen.pid) if self.popen is not None else "never started"

    def owns_pid(self, pid: int) -> bool:
        """Whether ``pid`` (as a node reports it to the scheduler) is this process or, on this host,
        one of its process group (a command wrapped in a shell)."""
        if pid == self.pid:
            return True
        if not self.spec.local or self.popen is None:
            return False
        try:
            return os.getpgid(pid) == self.popen.pid
        except OSError:
            return False

    def declare_dead(self, reason: str) -> None:
        """The scheduler declared it dead: keep why, and what it was doing then (a remote one's
        agent reports that when asked to stop it)."""
        self.dead_reason = reason
        if self.spec.local:
            self._dead_state = self.state()

    def death(self) -> Optional[str]:
        """``declared dead: no heartbeat for 4.1 s (state: stopped)``, or None."""
        if self.dead_reason is None:
            return None
        return f"declared dead: {self.dead_reason} (state: {self._dead_state or self.state()})"

    @property
    def had_to_be_killed(self) -> bool:
        """Whether it outlived the SIGTERM that ps-launch (or its remote agent) sent, so that only
        the SIGKILL after the grace ended it."""
        return self.stopped_by_launcher and self.exit_code() == -signal.SIGKILL

    def exit_code(self) -> Optional[int]:
        """None while running; the exit code (negative: killed by that signal) once it ended.
        For a remote process that is remote_child's report, so the ssh client's own code only
        shows when the remote side never reported (ssh failed or the connection broke)."""
        if self.start_error is not None:
            return 127
        code = self.popen.poll()
        if code is None:
            return None
        if not self.spec.local:
            self.join_output()
            if self.remote_exit is not None:
                return self.remote_exit
        return code

    def describe_exit(self) -> str:
        if self.start_error is not None:
            return self.start_error
        code = self.exit_code()
        if self.dead_reason is not None:
            ended = "still running" if code is None else f"ended by ps-launch: {exit_description(code)}"
            return f"{self.death()}; {ended}"
        if code is None:
            return "still running"
        if not self.spec.local and self.remote_exit is None:
            how = f"srun on node {self.spec.host}" if self.spec.launcher == "slurm" else f"ssh to {self.spec.host}"
            return (f"{how} ended with exit code {code} before the remote process reported its exit "
                    f"({how.split()[0]} could not start the command there, or the connection broke)")
        return exit_description(code)

    def join_output(self, timeout: float = OUTPUT_JOIN_TIMEOUT) -> None:
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout)

    # -- stopping ------------------------------------------------------------------------

    def terminate(self) -> None:
        """Ask it to stop: SIGTERM and SIGCONT to its process group, or EOF to the remote_child over
        ssh (which does the same there)."""
        if not self.running():
            return
        self.stopped_by_launcher = True
        if self.spec.local:
            terminate_group(self.popen.pid)
        else:
            _close_quietly(self.popen.stdin)

    def kill(self) -> Optional[subprocess.Popen]:
        """Force it: SIGKILL to its group; for a remote one also ``ssh HOST kill -KILL -- -PGID``,
        whose ssh process is returned for the caller to wait for."""
        fallback = None
        if not self.spec.local and self.remote_pgid is not None:
            try:
                argv = self._kill_argv()
                fallback = spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, new_session=True)
            except (OSError, ValueError):
                pass
        if self.running():
            _kill_group(self.popen.pid, signal.SIGKILL)
        return fallback

    def _kill_argv(self) -> list[str]:
        if self.spec.launcher == "slurm":
            return srun_script_argv(self.slurm_job, self.spec.host, kill_group_script(self.remote_pgid))
        return ssh_kill_argv(self.spec.host, self.spec.ssh_port, self.remote_pgid, self.ssh_config)

    def close(self) -> None:
        """After it ended: kill what it left in its group, finish reading its output."""
        if self.popen is None:
            return
        if self.spec.local:
            _kill_group(self.popen.pid, signal.SIGKILL)
        self.join_output()
        if self._reader is not None and self._reader.is_alive():
            # something outside its process group still holds the pipe; stop waiting for it
            self.console.message(f"{self.name}: output still open after it ended; not waiting for it")
        _close_quietly(self.popen.stdin)


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _close_quietly(stream: Optional[IO]) -> None:
    if stream is not None:
        try:
            stream.close()
        except OSError:
            pass


__all__ = ["Console", "JobProcess"]
