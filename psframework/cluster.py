"""``LocalCluster``: a scheduler and servers as child processes on this host.

>>> with ps.LocalCluster(num_servers=2, num_workers=2, mode="sync") as cluster:   # doctest: +SKIP
...     worker = ps.init(scheduler=cluster.scheduler)

The workers are yours to start (threads, processes, or ps.init() here); ``cluster.env()`` gives
the ``PS_*`` variables a worker process needs.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional

from .config import MODES, SchedulerConfig, Timing, config_to_env
from .errors import ConfigError, PSError, PSTimeoutError
from .security import MECHANISMS, JobSecret
from .procs import exit_description, python_module, spawn, stop_all


class LocalCluster:
    def __init__(self, num_servers: int = 1, num_workers: int = 1, mode: str = "sync", staleness: int = 2,
                 server_device: Optional[str] = "cpu", chunk_bytes: Optional[int] = None,
                 timing: Optional[Timing] = None, start_timeout: float = 30.0, auth: str = "none",
                 max_message_bytes: Optional[int] = None, elastic: bool = False, restart_servers: bool = False,
                 checkpoint_dir: Optional[str] = None, peer_buffer_bytes: Optional[int] = None,
                 metrics_port: Optional[int] = None, trace_dir: Optional[str] = None):
        if mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
        self.log_dir = Path(tempfile.mkdtemp(prefix="ps-local-"))  # mode 0700: the secret lives here
        extra = {"chunk_bytes": chunk_bytes} if chunk_bytes else {}
        if max_message_bytes:
            extra["max_message_bytes"] = max_message_bytes
        if peer_buffer_bytes:
            extra["peer_buffer_bytes"] = peer_buffer_bytes
        if auth not in MECHANISMS:
            raise ConfigError(f"auth must be one of {', '.join(MECHANISMS)}; got {auth!r}")
        if auth != "none":
            extra["secret_file"] = str(JobSecret.generate(auth).write(self.log_dir / "secret.json"))
        self.config = SchedulerConfig(num_workers=num_workers, num_servers=num_servers, mode=mode,
                                      staleness=staleness, server_device=server_device,
                                      timing=timing or Timing(), elastic=elastic,
                                      restart_servers=restart_servers,
                                      checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
                                      metrics_port=metrics_port,
                                      trace_dir=str(trace_dir) if trace_dir else None, **extra)
        self.start_timeout = start_timeout
        self.scheduler: str = ""
        self._procs: list[tuple[str, subprocess.Popen]] = []
        self._logs: list = []

    def start(self) -> "LocalCluster":
        try:
            address_file = self.log_dir / "scheduler.address"
            self._start("scheduler", python_module("psframework", "scheduler", "--address-file", str(address_file)))
            self.scheduler = self._wait_for_address(address_file)
            for rank in range(self.config.num_servers):
                self._start_server(rank)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_server(self, rank: int, name: Optional[str] = None) -> None:
        self._start(name or f"server-{rank}", python_module("psframework", "server", "--rank", str(rank)))

    def restart_server(self, rank: int) -> str:
        """Start a new process for server ``rank`` (whose old one died), as ps-launch
        --restart-failed-servers does; returns its name in ``processes()``."""
        name = f"server-{rank}.restart{sum(1 for n, _ in self._procs if n.startswith(f'server-{rank}.'))}"
        self._start_server(rank, name)
        return name

    @property
    def metrics_address(self) -> str:
        """``http://host:port/metrics`` of the scheduler (``metrics_port=`` given), as it printed it."""
        if self.config.metrics_port is None:
            raise ConfigError("this LocalCluster serves no metrics: pass metrics_port= (0: a free port)")
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            for line in self.output("scheduler", lines=50).splitlines():
                if line.startswith("PS_METRICS_ADDRESS="):
                    return line.split("=", 1)[1].strip()
            time.sleep(0.02)
        raise PSTimeoutError(f"the scheduler printed no metrics address within {self.start_timeout} s:\n"
                             f"{self.output('scheduler')}")

    def env(self) -> dict[str, str]:
        """The PS_* variables for a worker process of this cluster."""
        return {**config_to_env(self.config), "PS_SCHEDULER": self.scheduler}

    def _start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")
        self._logs.append(log)
        env = config_to_env(self.config)
        if self.scheduler:
            env["PS_SCHEDULER"] = self.scheduler
        self._procs.append((name, spawn(argv, env, stdout=log, stderr=subprocess.STDOUT)))

    def _wait_for_address(self, path: Path) -> str:
        deadline = time.monotonic() + self.start_timeout
        name, proc = self._procs[0]
        while time.monotonic() < deadline:
            if path.exists():
                return path.read_text().strip()
            if proc.poll() is not None:
                raise PSError(f"the scheduler exited ({exit_description(proc.returncode)}) before listening:\n"
                              f"{self.output(name)}")
            time.sleep(0.02)
        raise PSTimeoutError(f"the scheduler did not start listening within {self.start_timeout} s")

    def output(self, name: str, lines: int = 30) -> str:
        """The last lines a child printed (name: 'scheduler' or 'server-N')."""
        path = self.log_dir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def processes(self) -> dict[str, subprocess.Popen]:
        return dict(self._procs)

    def wait(self, timeout: float = 30.0) -> dict[str, int]:
        """Wait for every child to exit by itself (after all workers closed); returns exit codes."""
        deadline = time.monotonic() + timeout
        for name, proc in self._procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise PSTimeoutError(f"{name} did not exit within {timeout} s:\n{self.output(name)}") from None
        return {name: proc.returncode for name, proc in self._procs}

    def stop(self) -> None:
        stop_all([p for _, p in self._procs])
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)
