"""The job secret's files: one here, one copy on every other host of the job, all removed when it ends.

``SecretFiles(cfg).write()`` writes a fresh secret in a directory only this user can read (or takes
the user's ``--secret-file``, which it never removes) and
installs a copy on each remote host over ssh's stdin (under Slurm, each remote process's agent
writes and removes its own copy: ``remote_child --secret-file``) (``remote.ssh_install_file_argv``), at the
path ``remote.remote_secret_path`` gives that host (the one its processes get as
``PS_SECRET_FILE``); ``remove()`` deletes them all again, the remote ones in parallel and within a
deadline, and says what it could not remove.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import LaunchConfig
from .remote import remote_secret_path, ssh_install_file_argv, ssh_remove_file_argv
from .stopping import KILL_WAIT
from ..errors import ConfigError
from ..procs import spawn
from ..security import JobSecret

REMOVE_TIMEOUT = 10.0  # for all remote copies together


class SecretFiles:
    """Owns the secret's files of one job, here and on the remote hosts."""

    def __init__(self, cfg: LaunchConfig):
        self.cfg = cfg
        self._directory: Optional[str] = None
        self._remote: list[tuple[str, Optional[int], str]] = []  # (host, ssh port, path) installed there

    def write(self) -> Optional[str]:
        """The local secret's path (None with ``--auth none``), once every remote copy is in place."""
        if self.cfg.auth == "none":
            return None
        path = str(self._user_secret() if self.cfg.job_secret_file else self._fresh_secret())
        payload = Path(path).read_bytes()
        # under Slurm each remote process's agent writes its own copy (remote_child --secret-file)
        hosts = {(p.host, p.ssh_port) for p in self.cfg.layout.all()
                 if not self.cfg.runs_here(p.host) and self.cfg.launcher == "ssh"}
        for host, port in sorted(hosts, key=str):
            remote_path = remote_secret_path(path, host, port)
            argv = ssh_install_file_argv(host, port, remote_path, self.cfg.ssh_config)
            done = subprocess.run(argv, input=payload, capture_output=True, timeout=self.cfg.start_timeout)
            if done.returncode != 0:
                self.remove()
                raise ConfigError(f"cannot install the job secret on {host}: "
                                  f"{done.stderr.decode(errors='replace').strip() or done.returncode}")
            self._remote.append((host, port, remote_path))
        return path

    def _fresh_secret(self) -> Path:
        self._directory = tempfile.mkdtemp(prefix=f"ps-launch-{self.cfg.job_id}-")
        return JobSecret.generate(self.cfg.auth).write(Path(self._directory) / "secret.json")

    def _user_secret(self) -> Path:
        """``--secret-file``: the secret in it, or a fresh one written there; it stays after the job."""
        path = Path(self.cfg.job_secret_file).absolute()
        if not path.exists():
            return JobSecret.generate(self.cfg.auth).write(path)
        mechanism = JobSecret.load(path).mechanism
        if mechanism != self.cfg.auth:
            raise ConfigError(f"--secret-file {path} holds a {mechanism} secret but the job authenticates with "
                              f"--auth {self.cfg.auth}: pass --auth {mechanism}, or another file")
        return path

    def remove(self) -> list[str]:
        """Remove every copy; returns a line for each one that could not be removed."""
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
        removals = []
        for host, port, path in self._remote:
            argv = ssh_remove_file_argv(host, port, path, self.cfg.ssh_config)
            try:
                removals.append((host, path, spawn(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)))
            except OSError as exc:
                removals.append((host, path, exc))
        self._remote.clear()
        deadline = time.monotonic() + REMOVE_TIMEOUT
        return [problem for problem in (_finish(*removal, deadline) for removal in removals) if problem]


def _finish(host: str, path: str, removal, deadline: float) -> Optional[str]:
    failed = f"could not remove the job secret {path} on {host}"
    if isinstance(removal, OSError):
        return f"{failed}: {removal}"
    try:
        _, err = removal.communicate(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        removal.kill()
        try:
            removal.wait(timeout=KILL_WAIT)
        except subprocess.TimeoutExpired:
            pass
        return f"{failed}: ssh did not finish within {REMOVE_TIMEOUT:g} s"
    if removal.returncode != 0:
        return f"{failed}: {err.decode(errors='replace').strip() or f'exit code {removal.returncode}'}"
    return None


__all__ = ["REMOVE_TIMEOUT", "SecretFiles"]
