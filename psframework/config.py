"""Configuration: frozen dataclasses, and the one place that reads ``PS_*`` environment variables.

Configuration flows one way: click options or ``PS_*`` variables -> these dataclasses ->
constructors. Every variable is listed in ``ENV_VARS`` (and in the README).

>>> cfg = SchedulerConfig(num_workers=2, num_servers=1, mode="ssp", staleness=1)
>>> cfg.mode
'ssp'
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Mapping, Optional

from .errors import ConfigError
from .trace import parse_steps
from .sharding import DEFAULT_CHUNK_BYTES, default_chunk_bytes

MODES = ("sync", "async", "ssp")
DEFAULT_PEER_BUFFER_BYTES = 256 << 20
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30
DEFAULT_COMPRESS_MIN_BYTES = 64 << 10
DEFAULT_ROW_LANE_BYTES = 8 << 20
MAX_ROW_LANE_BYTES = 1 << 30  # of each row area of a lane: what a server maps at most

ENV_VARS = {
    "PS_SCHEDULER": "scheduler address, tcp://HOST:PORT (set by ps-launch for every process)",
    "PS_ROLE": "role of this process: scheduler, server or worker (set by ps-launch)",
    "PS_RANK": "rank of this process within its role (set by ps-launch)",
    "PS_NUM_WORKERS": "number of workers in the job",
    "PS_NUM_SERVERS": "number of servers in the job",
    "PS_MODE": "update mode: sync, async or ssp",
    "PS_STALENESS": "ssp staleness bound k (default 2)",
    "PS_SERVER_DEVICE": "device of the servers' shards: cpu, cuda, cuda:N (default cuda if available)",
    "PS_BIND": "address to bind and advertise (default 127.0.0.1 on a single host)",
    "PS_HOST": "name of this host in error messages (default: socket.gethostname())",
    "PS_CHUNK_BYTES": "tensors larger than this are split across servers, and blocks hold at most this (default 4 MiB; on GPU servers 64 MiB, 1 GiB for one that every worker reaches by CUDA IPC)",
    "PS_HEARTBEAT_INTERVAL": "seconds between heartbeats (default 0.5)",
    "PS_HEARTBEAT_TIMEOUT": "seconds without heartbeat before a node is declared dead (default 4)",
    "PS_START_TIMEOUT": "seconds for the whole cluster to register (default 60)",
    "PS_MAX_MESSAGE_BYTES": "largest frame a process accepts (default 1 GiB)",
    "PS_PEER_BUFFER_BYTES": "bytes of unread answers a server holds for one peer before it answers its pulls later (default 256 MiB)",
    "PS_LOG_LEVEL": "logging level of scheduler and server processes (default INFO)",
    "PS_CHECKPOINT_DIR": "directory of checkpoints (DistributedOptimizer saves and resumes there)",
    "PS_CHECKPOINT_EVERY": "DistributedOptimizer saves a checkpoint every N steps (0: never)",
    "PS_RESUME": "1: DistributedOptimizer resumes from the newest complete checkpoint",
    "PS_ELASTIC": "1: workers may die and join; sync steps average over the live workers",
    "PS_RESTART_FAILED_SERVERS": "1: a dead server may be restarted; it reloads its shards from the newest checkpoint",
    "PS_SECRET_FILE": "file with the job's secret (written by ps-launch, mode 0600); without it no authentication",
    "PS_ROW_LANE_BYTES": "workers: bytes of each of a lane's two row areas, for the rows of embedding tables; a row request that does not fit goes over the socket (default 8 MiB, 0: rows always over the socket)",
    "PS_SHM": "0: workers talk to servers on their own host over the socket too, not through shared-memory lanes (default 1)",
    "PS_TRACE_DIR": "every process appends Chrome trace events to a file of its own here (ps-launch --trace merges them)",
    "PS_TRACE_STEPS": "a:b: trace the workers' steps a to b-1 only (default all)",
    "PS_METRICS_PORT": "the scheduler serves the job's Prometheus metrics on this port (0: a free one, printed); default off",
    "PS_CUDA_IPC": "0: GPU workers and GPU servers of one host use the shared-memory lanes, not device lanes by CUDA IPC (default 1)",
    "PS_DIRECT": "0: servers of a worker's host neither read its host gradients nor write its values where they lie (default 1)",
    "PS_DIRECT_GPU": "0: nor its GPU tensors (by CUDA IPC); they go through the device lanes (default 1)",
    "PS_COMPRESS_MIN_BYTES": "workers: tensors smaller than this are pushed as they are, whatever compression= says (default 64 KiB)",
    "PS_COMPRESS_LOCAL": "1: workers compress pushes to servers of their own host too, over the socket instead of the lanes (default 0)",
}
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class Timing:
    """Liveness settings; the scheduler's values are sent to every node in its welcome."""

    heartbeat_interval: float = 0.5
    heartbeat_timeout: float = 4.0
    start_timeout: float = 60.0

    def __post_init__(self) -> None:
        _check(self.heartbeat_interval > 0, f"heartbeat interval must be > 0 s, got {self.heartbeat_interval}")
        _check(
            self.heartbeat_timeout > 2 * self.heartbeat_interval,
            f"heartbeat timeout ({self.heartbeat_timeout} s) must exceed twice the interval "
            f"({self.heartbeat_interval} s)",
        )
        _check(self.start_timeout > 0, f"start timeout must be > 0 s, got {self.start_timeout}")


@dataclass(frozen=True)
class SchedulerConfig:
    num_workers: int
    num_servers: int
    mode: str = "sync"
    staleness: int = 2
    bind_host: str = "127.0.0.1"
    port: int = 0
    chunk_bytes: Optional[int] = None  # None: by where the shards are (block_bytes)
    server_device: Optional[str] = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    timing: Timing = field(default_factory=Timing)
    secret_file: Optional[str] = None
    elastic: bool = False
    restart_servers: bool = False
    checkpoint_dir: Optional[str] = None
    host: str = field(default_factory=socket.gethostname)
    log_level: str = "INFO"
    peer_buffer_bytes: int = DEFAULT_PEER_BUFFER_BYTES
    metrics_port: Optional[int] = None  # None: no metrics endpoint; 0: a free port
    trace_dir: Optional[str] = None  # every process's trace events (psframework/trace.py)
    trace_steps: Optional[str] = None  # "a:b", as PS_TRACE_STEPS

    def __post_init__(self) -> None:
        _check(self.peer_buffer_bytes >= 1, f"PS_PEER_BUFFER_BYTES must be >= 1, got {self.peer_buffer_bytes}")
        _check(self.log_level in LOG_LEVELS, f"log level must be one of {', '.join(LOG_LEVELS)}; got {self.log_level!r}")
        _check(self.num_workers >= 1, f"need at least 1 worker, got {self.num_workers}")
        _check(self.num_servers >= 1, f"need at least 1 server, got {self.num_servers}")
        _check(self.mode in MODES, f"mode must be one of {', '.join(MODES)}; got {self.mode!r}")
        _check(self.staleness >= 0, f"staleness must be >= 0, got {self.staleness}")
        _check(0 <= self.port <= 65535, f"port must be in 0..65535, got {self.port}")
        parse_steps(self.trace_steps)
        _check(self.metrics_port is None or 0 <= self.metrics_port <= 65535,
               f"metrics port must be in 0..65535 (0: a free one), got {self.metrics_port}")
        _check(self.max_message_bytes >= 1024, f"max message size too small: {self.max_message_bytes}")
        if self.chunk_bytes is not None:
            _check(self.chunk_bytes >= 1, f"chunk size must be >= 1 byte, got {self.chunk_bytes}")
            _check(self.chunk_bytes <= self.max_message_bytes,
                   f"chunk size {self.chunk_bytes} exceeds the max message size {self.max_message_bytes}: "
                   "every block would be refused; lower PS_CHUNK_BYTES or raise PS_MAX_MESSAGE_BYTES")
        if self.server_device is not None:
            check_device(self.server_device)

    def block_bytes(self, device_lanes_only: bool = False) -> int:
        """The job's block size: ``chunk_bytes`` where given, else by where the shards are and, with
        ``device_lanes_only`` (every worker reaches the servers by CUDA IPC), how the workers reach
        them (``sharding.default_chunk_bytes``), at most a message."""
        if self.chunk_bytes is not None:
            return self.chunk_bytes
        return min(default_chunk_bytes(self.server_device, self.num_servers, device_lanes_only),
                   self.max_message_bytes)


@dataclass(frozen=True)
class NodeConfig:
    """What a server or worker process needs to join a job."""

    scheduler: str
    rank: Optional[int] = None
    bind_host: str = "127.0.0.1"
    host: str = field(default_factory=socket.gethostname)
    device: Optional[str] = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    start_timeout: float = 60.0
    secret_file: Optional[str] = None
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0
    resume: bool = False
    shm: bool = True  # workers: shared-memory lanes to the servers of their own host
    cuda_ipc: bool = True  # workers on a GPU: device lanes to GPU servers of their host (CUDA IPC)
    direct: bool = True  # workers: servers of their host read and write shared host tensors where they lie
    direct_gpu: bool = True  # workers: and GPU tensors, by CUDA IPC
    row_lane_bytes: int = DEFAULT_ROW_LANE_BYTES  # workers: of each row area of a lane (datapath/lane.py)
    peer_buffer_bytes: int = DEFAULT_PEER_BUFFER_BYTES  # servers: unread answers held for one peer
    compress_min_bytes: int = DEFAULT_COMPRESS_MIN_BYTES  # workers: smaller tensors go as they are
    compress_local: bool = False  # workers: compress to servers of their own host too (not through lanes)
    trace_dir: Optional[str] = None  # psframework/trace.py
    trace_steps: Optional[tuple[int, int]] = None

    @property
    def direct_paths(self) -> tuple[bool, bool]:
        """Whether workers exchange shared host tensors, and GPU tensors, where they lie."""
        return self.direct, self.direct_gpu

    def __post_init__(self) -> None:
        check_address(self.scheduler)
        _check(self.compress_min_bytes >= 0, f"PS_COMPRESS_MIN_BYTES must be >= 0, got {self.compress_min_bytes}")
        _check(self.checkpoint_every >= 0, f"checkpoint interval must be >= 0 steps, got {self.checkpoint_every}")
        _check(self.rank is None or self.rank >= 0, f"rank must be >= 0, got {self.rank}")
        _check(self.peer_buffer_bytes >= 1, f"PS_PEER_BUFFER_BYTES must be >= 1, got {self.peer_buffer_bytes}")
        _check(0 <= self.row_lane_bytes <= MAX_ROW_LANE_BYTES,
               f"PS_ROW_LANE_BYTES must be between 0 and 1 GiB, got {self.row_lane_bytes}")
        if self.device is not None:
            check_device(self.device)


def check_address(address: str) -> str:
    """``tcp://HOST:PORT``, with ``#KEY`` (64 hex digits) where the listener has a CURVE key."""
    _check(
        address.startswith(("tcp://", "ipc://", "inproc://", "mem://")),
        f"scheduler address must look like tcp://HOST:PORT, got {address!r}",
    )
    endpoint, hashed, key = address.partition("#")
    if hashed:
        _check(len(key) == 64 and all(c in "0123456789abcdef" for c in key),
               f"address {address!r}: what follows '#' must be the listener's key, 64 hex digits")
    if endpoint.startswith("tcp://"):
        port = endpoint.rsplit(":", 1)[-1]
        _check(port.isdigit(), f"scheduler address {address!r} has no port; use tcp://HOST:PORT")
    return address


def check_device(device: str) -> str:
    kind, _, index = device.partition(":")
    _check(
        kind in ("cpu", "cuda") and (not index or index.isdigit()) and not (kind == "cpu" and index),
        f"device must be cpu, cuda or cuda:N; got {device!r}",
    )
    return device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _typed(name: str, raw: str, kind: type):
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name}={raw!r} is not a valid {kind.__name__}") from None


def _env(environ: Mapping[str, str], name: str, kind: type = str, default=None):
    raw = environ.get(name)
    if raw is None or raw == "":
        return default
    return _typed(name, raw, kind)


def _flag(environ: Mapping[str, str], name: str, default: bool = False) -> bool:
    return _env(environ, name, str, "1" if default else "0").lower() in ("1", "true", "yes", "on")


def timing_from_env(environ: Optional[Mapping[str, str]] = None) -> Timing:
    env = os.environ if environ is None else environ
    base = Timing()
    return Timing(
        heartbeat_interval=_env(env, "PS_HEARTBEAT_INTERVAL", float, base.heartbeat_interval),
        heartbeat_timeout=_env(env, "PS_HEARTBEAT_TIMEOUT", float, base.heartbeat_timeout),
        start_timeout=_env(env, "PS_START_TIMEOUT", float, base.start_timeout),
    )


def scheduler_config_from_env(environ: Optional[Mapping[str, str]] = None, **overrides) -> SchedulerConfig:
    env = os.environ if environ is None else environ
    values = dict(
        num_workers=_env(env, "PS_NUM_WORKERS", int, 1),
        num_servers=_env(env, "PS_NUM_SERVERS", int, 1),
        mode=_env(env, "PS_MODE", str, "sync"),
        staleness=_env(env, "PS_STALENESS", int, 2),
        bind_host=_env(env, "PS_BIND", str, "127.0.0.1"),
        chunk_bytes=_env(env, "PS_CHUNK_BYTES", int, None),
        server_device=_env(env, "PS_SERVER_DEVICE", str, None),
        max_message_bytes=_env(env, "PS_MAX_MESSAGE_BYTES", int, DEFAULT_MAX_MESSAGE_BYTES),
        timing=timing_from_env(env),
        secret_file=_env(env, "PS_SECRET_FILE", str, None),
        elastic=_flag(env, "PS_ELASTIC"),
        restart_servers=_flag(env, "PS_RESTART_FAILED_SERVERS"),
        checkpoint_dir=_env(env, "PS_CHECKPOINT_DIR", str, None),
        host=_env(env, "PS_HOST", str, None),
        log_level=log_level_from_env(env),
        peer_buffer_bytes=_env(env, "PS_PEER_BUFFER_BYTES", int, DEFAULT_PEER_BUFFER_BYTES),
        metrics_port=_env(env, "PS_METRICS_PORT", int, None),
        trace_dir=_env(env, "PS_TRACE_DIR", str, None),
        trace_steps=_env(env, "PS_TRACE_STEPS", str, None),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["host"] is None:
        del values["host"]
    return SchedulerConfig(**values)


ROUTINGS = ("least-in-flight", "round-robin")


@dataclass(frozen=True)
class ServeConfig:
    """``ps-serve``: the model (``MODULE:FACTORY``), where its weights come from (a live job through
    a reader, or an exported file), and how requests are taken (``psframework/serve``)."""

    factory: str
    from_job: Optional[str] = None
    from_file: Optional[str] = None
    secret_file: Optional[str] = None
    bind_host: str = "127.0.0.1"
    port: int = 8000
    replicas: int = 1
    routing: str = "least-in-flight"
    max_batch: int = 64
    max_delay_ms: float = 5.0
    max_body_bytes: int = 16 << 20
    input_shape: Optional[tuple[int, ...]] = None  # of one example; None: the model's ``input_shape``
    input_dtype: str = "float32"
    device: str = "cpu"
    refresh_every: float = 1.0  # seconds between looks at the job's versions
    timeout: float = 30.0  # for the job's welcome and each read

    def __post_init__(self) -> None:
        module, _, factory = self.factory.partition(":")
        _check(bool(module and factory), f"the model must be given as MODULE:FACTORY, got {self.factory!r}")
        _check((self.from_job is None) != (self.from_file is None), "give exactly one of --from-job and --from-file")
        if self.from_job is not None:
            check_address(self.from_job)
        _check(self.replicas >= 1, f"--replicas must be >= 1, got {self.replicas}")
        _check(self.routing in ROUTINGS, f"--routing must be one of {', '.join(ROUTINGS)}, got {self.routing!r}")
        _check(self.max_batch >= 1, f"--max-batch must be >= 1, got {self.max_batch}")
        _check(self.max_delay_ms >= 0, f"--max-delay-ms must be >= 0, got {self.max_delay_ms}")
        _check(self.max_body_bytes >= 1, f"--max-body-bytes must be >= 1, got {self.max_body_bytes}")
        _check(self.refresh_every > 0, f"--refresh-every must be > 0 seconds, got {self.refresh_every}")
        _check(0 <= self.port < 65536, f"--port must be 0..65535, got {self.port}")
        _check(self.input_shape is None or all(d >= 1 for d in self.input_shape),
               f"--input-shape: every size must be >= 1, got {self.input_shape}")
        check_device(self.device)


@dataclass(frozen=True)
class Tuning:
    """Settings without a ps-launch option that ps-launch passes on from its own environment."""

    timing: Timing = field(default_factory=Timing)
    chunk_bytes: Optional[int] = None  # None: the job's default (SchedulerConfig)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    log_level: str = "INFO"
    peer_buffer_bytes: int = DEFAULT_PEER_BUFFER_BYTES


def tuning_from_env(environ: Optional[Mapping[str, str]] = None) -> Tuning:
    env = os.environ if environ is None else environ
    return Tuning(timing=timing_from_env(env),
                  chunk_bytes=_env(env, "PS_CHUNK_BYTES", int, None),
                  max_message_bytes=_env(env, "PS_MAX_MESSAGE_BYTES", int, DEFAULT_MAX_MESSAGE_BYTES),
                  log_level=log_level_from_env(env),
                  peer_buffer_bytes=_env(env, "PS_PEER_BUFFER_BYTES", int, DEFAULT_PEER_BUFFER_BYTES))


def host_environment(environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """This process's environment without a single ``PS_*`` variable: what a child on this host
    starts from. The job's ``PS_*`` variables reach children only from a config (``config_to_env``)
    or from what the user exports (``ps-launch -x``), never by accident from the shell."""
    env = os.environ if environ is None else environ
    return {k: v for k, v in env.items() if not k.startswith("PS_")}


def process_environment() -> dict[str, str]:
    """This process's whole environment: where ps-launch finds a Slurm allocation (SLURM_*)."""
    return dict(os.environ)


def exported_value(name: str, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The value of ``name`` here, for ``ps-launch -x NAME`` (None if unset)."""
    return (os.environ if environ is None else environ).get(name)


def remote_forwarded(environ: Optional[Mapping[str, str]] = None) -> tuple[tuple[str, str], ...]:
    """Variables that processes on other hosts get from ours (sshd passes none): ``PYTHONPATH``."""
    env = os.environ if environ is None else environ
    return tuple((k, env[k]) for k in ("PYTHONPATH",) if env.get(k))


def node_config_from_env(environ: Optional[Mapping[str, str]] = None, **overrides) -> NodeConfig:
    """A server's or worker's config from ``PS_*`` variables; keyword overrides win when not None."""
    env = os.environ if environ is None else environ
    values = dict(
        scheduler=_env(env, "PS_SCHEDULER", str, None),
        rank=_env(env, "PS_RANK", int, None),
        bind_host=_env(env, "PS_BIND", str, "127.0.0.1"),
        host=_env(env, "PS_HOST", str, None),
        device=_env(env, "PS_SERVER_DEVICE", str, None),
        max_message_bytes=_env(env, "PS_MAX_MESSAGE_BYTES", int, DEFAULT_MAX_MESSAGE_BYTES),
        start_timeout=_env(env, "PS_START_TIMEOUT", float, 60.0),
        secret_file=_env(env, "PS_SECRET_FILE", str, None),
        checkpoint_dir=_env(env, "PS_CHECKPOINT_DIR", str, None),
        checkpoint_every=_env(env, "PS_CHECKPOINT_EVERY", int, 0),
        resume=_flag(env, "PS_RESUME"),
        shm=_flag(env, "PS_SHM", default=True),
        cuda_ipc=_flag(env, "PS_CUDA_IPC", default=True),
        direct=_flag(env, "PS_DIRECT", default=True),
        direct_gpu=_flag(env, "PS_DIRECT_GPU", default=True),
        row_lane_bytes=_env(env, "PS_ROW_LANE_BYTES", int, DEFAULT_ROW_LANE_BYTES),
        peer_buffer_bytes=_env(env, "PS_PEER_BUFFER_BYTES", int, DEFAULT_PEER_BUFFER_BYTES),
        compress_min_bytes=_env(env, "PS_COMPRESS_MIN_BYTES", int, DEFAULT_COMPRESS_MIN_BYTES),
        compress_local=_flag(env, "PS_COMPRESS_LOCAL"),
        trace_dir=_env(env, "PS_TRACE_DIR", str, None),
        trace_steps=parse_steps(env.get("PS_TRACE_STEPS")),
    )
    values.update({k: v for k, v in overrides.items() if v is not None})
    if values["scheduler"] is None:
        raise ConfigError(
            "no scheduler address: run under ps-launch, set PS_SCHEDULER=tcp://HOST:PORT, "
            "or pass scheduler= to ps.init()"
        )
    if values["host"] is None:
        del values["host"]
    return NodeConfig(**values)


def log_level_from_env(environ: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if environ is None else environ
    level = _env(env, "PS_LOG_LEVEL", str, "INFO").upper()
    _check(level in LOG_LEVELS, f"PS_LOG_LEVEL={level!r}: use one of {', '.join(LOG_LEVELS)}")
    return level


def config_to_env(config: SchedulerConfig) -> dict[str, str]:
    """The PS_* variables that describe a job, for child processes."""
    env = {
        "PS_NUM_WORKERS": str(config.num_workers),
        "PS_NUM_SERVERS": str(config.num_servers),
        "PS_MODE": config.mode,
        "PS_STALENESS": str(config.staleness),
        "PS_MAX_MESSAGE_BYTES": str(config.max_message_bytes),
        "PS_HEARTBEAT_INTERVAL": str(config.timing.heartbeat_interval),
        "PS_HEARTBEAT_TIMEOUT": str(config.timing.heartbeat_timeout),
        "PS_START_TIMEOUT": str(config.timing.start_timeout),
        "PS_LOG_LEVEL": config.log_level,
        "PS_PEER_BUFFER_BYTES": str(config.peer_buffer_bytes),
    }
    if config.server_device:
        env["PS_SERVER_DEVICE"] = config.server_device
    if config.chunk_bytes is not None:  # else the scheduler picks it at registration (block_bytes)
        env["PS_CHUNK_BYTES"] = str(config.chunk_bytes)
    if config.secret_file:
        env["PS_SECRET_FILE"] = config.secret_file
    if config.elastic:
        env["PS_ELASTIC"] = "1"
    if config.restart_servers:
        env["PS_RESTART_FAILED_SERVERS"] = "1"
    if config.checkpoint_dir:
        env["PS_CHECKPOINT_DIR"] = config.checkpoint_dir
    if config.metrics_port is not None:
        env["PS_METRICS_PORT"] = str(config.metrics_port)
    if config.trace_dir:
        env["PS_TRACE_DIR"] = config.trace_dir
    if config.trace_steps:
        env["PS_TRACE_STEPS"] = config.trace_steps
    return env


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_COMPRESS_MIN_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "ENV_VARS",
    "LOG_LEVELS",
    "MODES",
    "NodeConfig",
    "SchedulerConfig",
    "Timing",
    "Tuning",
    "config_to_env",
    "exported_value",
    "host_environment",
    "log_level_from_env",
    "node_config_from_env",
    "remote_forwarded",
    "scheduler_config_from_env",
    "timing_from_env",
    "tuning_from_env",
]
