"""``LaunchConfig``: everything ps-launch was asked to do, checked once, frozen.

The click layer (``launch/cli.py``) turns options and ``PS_*`` variables into a ``LaunchConfig``;
the job (``launch/job.py``) only reads it. ``__post_init__`` rejects bad input with a
``ConfigError`` (exit code 2) and places every process on a host.

Example::

    >>> cfg = LaunchConfig(command=("python", "train.py"), num_workers=2, mode="ssp", staleness=1)
    >>> [(p.role, p.rank, p.host) for p in cfg.layout.all()]
    [('scheduler', 0, '127.0.0.1'), ('server', 0, '127.0.0.1'), ('worker', 0, '127.0.0.1'), ('worker', 1, '127.0.0.1')]
    >>> cfg.scheduler_config().mode
    'ssp'
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import secrets
import sys
from dataclasses import dataclass, field
from typing import Optional

from .hostfile import HostEntry
from .hosts import is_local_host, split_host_port
from .placement import JobLayout, plan_job
from .slurm import LAUNCHERS, SlurmAllocation
from ..config import (DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_PEER_BUFFER_BYTES, SchedulerConfig,
                      Timing, exported_value)
from ..errors import ConfigError
from ..security import MECHANISMS
from ..trace import parse_steps

# Every variable ps-launch reads, with the option it stands for (README_ENV.md shows this table).
LAUNCH_ENV_VARS = {
    "PS_HOSTFILE": ("-H, --hostfile", "hostfile to place the job on"),
    "PS_NUM_WORKERS": ("-n, --num-workers", "number of workers"),
    "PS_NUM_SERVERS": ("-s, --num-servers", "number of servers"),
    "PS_MODE": ("--mode", "sync, async or ssp"),
    "PS_STALENESS": ("--staleness", "ssp staleness bound"),
    "PS_SERVER_DEVICE": ("--server-device", "cpu, cuda or cuda:N"),
    "PS_SCHEDULER_HOST": ("--scheduler", "HOST[:PORT] of the scheduler"),
    "PS_BIND": ("--bind", "address to bind and advertise on this host"),
    "PS_ENV": ("-x, --env", "space-separated NAME[=VALUE] list to export"),
    "PS_LOG_DIR": ("--log-dir", "directory for one log file per process"),
    "PS_START_TIMEOUT": ("--start-timeout", "seconds for the whole cluster to come up"),
    "PS_VERBOSE": ("-v, --verbose", "also show the scheduler's and servers' INFO lines"),
    "PS_TRACE_DIR": ("--trace", "directory for every process's trace events and the merged trace.json"),
    "PS_TRACE_STEPS": ("--trace-steps", "a:b: trace only the workers' steps a to b-1"),
    "PS_METRICS_PORT": ("--metrics-port", "serve the job's Prometheus metrics on this port (0: a free one)"),
    "PS_SSH_CONFIG": ("--ssh-config", "ssh client config file (ssh -F)"),
    "PS_JOB_ID": ("--job-id", "job id exported to every process"),
    "PS_AUTH": ("--auth", "token (default), curve or none: how processes of the job authenticate"),
    "PS_JOB_SECRET_FILE": ("--secret-file", "the job secret's file, kept after the job (readers, ps-serve)"),
    "PS_CHECKPOINT_DIR": ("--checkpoint-dir", "directory of checkpoints"),
    "PS_CHECKPOINT_EVERY": ("--checkpoint-every", "save a checkpoint every N steps (DistributedOptimizer)"),
    "PS_RESUME": ("--resume", "resume from the newest complete checkpoint"),
    "PS_RESTART_FAILED_SERVERS": ("--restart-failed-servers", "restart a dead server from the newest checkpoint"),
    "PS_ELASTIC": ("--elastic", "workers may die (the others go on) and join"),
    "PS_STOP_GRACE": ("--stop-grace", "seconds from SIGTERM to SIGKILL when ps-launch ends a process"),
    "PS_LAUNCHER": ("--launcher", "ssh or slurm: how processes of other hosts start"),
    "PS_SERVERS_PER_NODE": ("--servers-per-node", "servers on every host"),
    "PS_FROM_SLURM": ("--from-slurm", "run as one task of srun -n 1+S+W, the role by SLURM_PROCID"),
    "PS_WORKER_THREADS": ("--worker-threads", "OMP_NUM_THREADS of every worker"),
}

# Set by ps-launch for each process; a user value (-x) would silently break the job.
RESERVED_VARS = frozenset({
    "PS_ROLE", "PS_RANK", "PS_SCHEDULER", "PS_BIND", "PS_HOST", "PS_JOB_ID", "PS_NUM_WORKERS",
    "PS_NUM_SERVERS", "PS_MODE", "PS_STALENESS", "PS_SERVER_DEVICE", "PS_START_TIMEOUT",
    "PS_SECRET_FILE", "PS_CHECKPOINT_DIR", "PS_CHECKPOINT_EVERY", "PS_RESUME", "PS_ELASTIC",
    "PS_RESTART_FAILED_SERVERS",
})
_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_JOB_ID_RE = re.compile(r"[A-Za-z0-9_.-]+")
DEFAULT_STOP_GRACE = 3.0


@dataclass(frozen=True)
class LaunchConfig:
    """What to run and where. ``layout`` is computed from the rest and says where each process runs."""

    command: tuple[str, ...]
    hosts: Optional[tuple[HostEntry, ...]] = None
    hostfile: Optional[str] = None
    num_workers: Optional[int] = None
    num_servers: Optional[int] = None
    mode: str = "sync"
    staleness: int = 2
    server_device: Optional[str] = None
    scheduler: Optional[str] = None
    bind: Optional[str] = None
    env: tuple[tuple[str, str], ...] = ()
    forward_env: tuple[tuple[str, str], ...] = ()
    log_dir: Optional[str] = None
    verbose: bool = False  # the scheduler's and servers' INFO lines on the console too
    metrics_port: Optional[int] = None  # the scheduler's Prometheus endpoint; 0: a free port
    trace_dir: Optional[str] = None  # every process's trace events, merged into trace.json at the end
    trace_steps: Optional[str] = None
    timing: Timing = field(default_factory=Timing)
    chunk_bytes: Optional[int] = None  # None: by where the shards are (SchedulerConfig)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_level: str = "INFO"
    peer_buffer_bytes: int = DEFAULT_PEER_BUFFER_BYTES
    ssh_config: Optional[str] = None
    job_id: str = field(default_factory=lambda: secrets.token_hex(6))
    python: str = sys.executable
    cwd: str = field(default_factory=os.getcwd)
    auth: str = "token"
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    restart_failed_servers: bool = False
    elastic: bool = False
    max_restarts: int = 3
    stop_grace: float = DEFAULT_STOP_GRACE  # SIGTERM (with SIGCONT) -> SIGKILL, whenever ps-launch ends a process
    secret_file: Optional[str] = None  # set by the job once it has written the secret
    job_secret_file: Optional[str] = None  # --secret-file: the user's, kept after the job
    launcher: str = "ssh"  # how processes of other hosts start: ssh, or srun ("slurm")
    slurm: Optional[SlurmAllocation] = None  # the allocation ps-launch runs in, if any
    node_addresses: tuple[tuple[str, str], ...] = ()  # Slurm's NodeAddr of each node
    servers_per_node: Optional[int] = None
    worker_threads: Optional[int] = None  # every worker's OMP_NUM_THREADS; None: by host (worker_threads_on)
    host_cores: int = field(default_factory=lambda: os.cpu_count() or 1)  # of this host
    layout: JobLayout = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("no command to run: put the worker command after the options, "
                              "e.g. ps-launch -n 2 -- python train.py")
        for name, _ in self.env:
            check_export_name(name)
        if self.scheduler:
            split_host_port(self.scheduler)
        if self.auth not in MECHANISMS:
            raise ConfigError(f"--auth must be one of {', '.join(MECHANISMS)}; got {self.auth!r}")
        for flag, wanted in (("--restart-failed-servers", self.restart_failed_servers),
                             ("--resume", self.resume), ("--checkpoint-every", self.checkpoint_every)):
            if wanted and not self.checkpoint_dir:
                raise ConfigError(f"{flag} needs --checkpoint-dir: that is where checkpoints are written and read")
        parse_steps(self.trace_steps)
        if self.checkpoint_every < 0:
            raise ConfigError(f"--checkpoint-every must be >= 0 steps, got {self.checkpoint_every}")
        if not (math.isfinite(self.stop_grace) and self.stop_grace >= 0):
            raise ConfigError(f"--stop-grace must be a number of seconds >= 0, got {self.stop_grace}")
        if not _JOB_ID_RE.fullmatch(self.job_id):
            raise ConfigError(f"job id must be letters, digits, '.', '_' or '-'; got {self.job_id!r}")
        self._check_launcher()
        num_servers = self.num_servers
        if self.servers_per_node is not None:
            if self.servers_per_node < 1:
                raise ConfigError(f"--servers-per-node must be at least 1, got {self.servers_per_node}")
            if self.hosts is None:
                num_servers = num_servers or self.servers_per_node
            else:
                object.__setattr__(self, "hosts", tuple(dataclasses.replace(h, servers=self.servers_per_node)
                                                        for h in self.hosts))
        source = self.hostfile or (self.slurm.source if self.slurm else "<hostfile>")
        layout = plan_job(self.hosts, self.num_workers, num_servers, scheduler_host=self.scheduler,
                          source=source, local_host=self.bind or "127.0.0.1")
        object.__setattr__(self, "layout", layout)
        self.scheduler_config()  # checks mode, staleness and device with the core's own rules

    def _check_launcher(self) -> None:
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"--launcher must be one of {', '.join(LAUNCHERS)}; got {self.launcher!r}")
        if self.launcher == "slurm" and self.slurm is None:
            raise ConfigError("--launcher slurm needs a Slurm allocation (SLURM_JOB_ID and SLURM_JOB_NODELIST "
                              "are not set): run ps-launch in an sbatch script or under salloc")

    def runs_here(self, host: str) -> bool:
        """Whether processes placed on ``host`` run on this machine, directly; under Slurm, only
        those of the node ps-launch runs on (nodes may share an address, as in a test cluster)."""
        if self.hosts is None:
            return True
        if self.launcher == "slurm":
            return host == self.slurm.this_node
        return is_local_host(host)

    @property
    def start_timeout(self) -> float:
        return self.timing.start_timeout

    @property
    def scheduler_port(self) -> int:
        """The scheduler's port from ``--scheduler HOST:PORT``; 0 means a free one."""
        return (split_host_port(self.scheduler)[1] or 0) if self.scheduler else 0

    def scheduler_config(self) -> SchedulerConfig:
        """The job as the core sees it; its ``config_to_env`` is what every process gets."""
        return SchedulerConfig(
            num_workers=len(self.layout.workers), num_servers=len(self.layout.servers), mode=self.mode,
            staleness=self.staleness, port=self.scheduler_port, chunk_bytes=self.chunk_bytes,
            server_device=self.server_device, max_message_bytes=self.max_message_bytes, timing=self.timing,
            secret_file=self.secret_file, elastic=self.elastic, restart_servers=self.restart_failed_servers,
            checkpoint_dir=self.checkpoint_dir, log_level=self.log_level, peer_buffer_bytes=self.peer_buffer_bytes,
            metrics_port=self.metrics_port, trace_dir=self.trace_dir and os.path.abspath(self.trace_dir),
            trace_steps=self.trace_steps)

    def worker_threads_on(self, host: str) -> Optional[int]:
        """The OMP_NUM_THREADS of the workers on ``host`` (None: torch's default, all its cores).
        ``--worker-threads`` if given; else this host's cores shared among the job's servers and
        workers on it, and on another host, whose cores are unknown here, 1 where the job runs more
        than one process, as torchrun does: every worker's torch would otherwise start a thread per
        core, and on a host shared by several they spin against each other."""
        if self.worker_threads is not None:
            return self.worker_threads
        sharing = sum(1 for p in self.layout.all() if p.host == host and p.role != "scheduler")
        if self.runs_here(host):
            return max(1, self.host_cores // sharing)
        return 1 if sharing > 1 else None

    def worker_env(self) -> dict[str, str]:
        """What only workers need: DistributedOptimizer's checkpoint schedule."""
        env = {}
        if self.checkpoint_every:
            env["PS_CHECKPOINT_EVERY"] = str(self.checkpoint_every)
        if self.resume:
            env["PS_RESUME"] = "1"
        return env


def check_export_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"-x {name!r}: not a valid environment variable name")
    if name in RESERVED_VARS:
        raise ConfigError(f"-x {name}: ps-launch sets {name} itself for every process; "
                          "use the matching ps-launch option instead")
    return name


def parse_exports(items: tuple[str, ...], environ: Optional[dict[str, str]] = None) -> tuple[tuple[str, str], ...]:
    """``-x NAME=VALUE`` or ``-x NAME`` (value taken from ``environ``, default this process's), as
    mpirun -x does."""
    exports: dict[str, str] = {}
    for item in items:
        name, eq, value = item.partition("=")
        check_export_name(name)
        if not eq:
            value = exported_value(name, environ)
            if value is None:
                raise ConfigError(f"-x {name}: {name} is not set here; write -x {name}=VALUE")
        exports[name] = value
    return tuple(exports.items())


__all__ = ["DEFAULT_STOP_GRACE", "LAUNCH_ENV_VARS", "LaunchConfig", "RESERVED_VARS", "check_export_name",
           "parse_exports"]
