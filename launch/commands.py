"""What each process of a job runs: its argv, its environment and the address it binds.

Example::

    >>> from launch.config import LaunchConfig
    >>> cfg = LaunchConfig(command=("python", "train.py"), num_workers=2, job_id="j1", python="/py")
    >>> addresses = host_addresses(cfg)
    >>> scheduler_process(cfg, addresses).argv
    ('/py', '-m', 'psframework', 'scheduler', '--bind', '127.0.0.1')
    >>> worker = node_processes(cfg, addresses, "tcp://127.0.0.1:5000")[-1]
    >>> worker.name, worker.argv, worker.environ["PS_RANK"], worker.environ["PS_SCHEDULER"]
    ('worker 1', ('python', 'train.py'), '1', 'tcp://127.0.0.1:5000')

Processes on a host that is this machine run directly; the others through ssh (``launch/remote.py``),
or srun inside a Slurm allocation (``launch/slurm.py``).
A process binds and advertises its host's address, so the other hosts can reach it: 127.0.0.1 when
the whole job runs here, otherwise the host's hostfile address (``--bind`` for this host).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from .config import LaunchConfig
from .placement import Placement
from .remote import remote_secret_path
from ..config import config_to_env
from ..errors import ConfigError


@dataclass(frozen=True)
class ProcessSpec:
    """One process of the job: who it is, where it runs, and what it runs there."""

    role: str
    rank: int
    host: str
    ssh_port: Optional[int]
    local: bool
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    launcher: str = "ssh"  # how it starts when not local: ssh, or srun ("slurm")

    @property
    def name(self) -> str:
        """``scheduler``, ``server 0``, ``worker 1``: how output and reports name it."""
        return self.role if self.role == "scheduler" else f"{self.role} {self.rank}"

    @property
    def log_name(self) -> str:
        return self.role if self.role == "scheduler" else f"{self.role}-{self.rank}"

    @property
    def environ(self) -> dict[str, str]:
        return dict(self.env)


def host_addresses(cfg: LaunchConfig) -> dict[str, str]:
    """The address that processes on each host of the layout bind and advertise."""
    hosts = cfg.layout.hosts()
    local = {host: cfg.runs_here(host) for host in hosts}
    if cfg.launcher == "slurm":
        return _node_addresses(cfg, hosts, local)
    if all(local.values()):
        return {host: cfg.bind or "127.0.0.1" for host in hosts}
    return {host: _reachable_address(host, local[host], cfg.bind) for host in hosts}


def _node_addresses(cfg: LaunchConfig, hosts: tuple[str, ...], local: Mapping[str, bool]) -> dict[str, str]:
    """Slurm nodes bind their NodeAddr: their names need not resolve. Nodes that all have loopback
    addresses are one machine (a test cluster); one loopback node among others is unreachable."""
    node_addr = dict(cfg.node_addresses)
    addresses = {host: cfg.bind if local[host] and cfg.bind else resolve(node_addr.get(host, host)) for host in hosts}
    loopback = [host for host, address in addresses.items() if _is_loopback(address)]
    if loopback and len(loopback) < len(addresses):
        raise ConfigError(f"Slurm node {loopback[0]!r} has the loopback address {addresses[loopback[0]]}, which the "
                          "other nodes cannot reach; fix its NodeAddr in slurm.conf, or pass --bind on that node")
    return addresses


def scheduler_process(cfg: LaunchConfig, addresses: Mapping[str, str]) -> ProcessSpec:
    placement = cfg.layout.scheduler
    address = addresses[placement.host]
    argv = [cfg.python, "-m", "psframework", "scheduler", "--bind", address]
    if cfg.scheduler_port:
        argv += ["--port", str(cfg.scheduler_port)]
    return _spec(cfg, placement, address, argv, scheduler_address=None)


def node_processes(cfg: LaunchConfig, addresses: Mapping[str, str], scheduler_address: str) -> list[ProcessSpec]:
    """The servers, then the workers, of a job whose scheduler listens at ``scheduler_address``."""
    specs = []
    for placement in cfg.layout.servers:
        address = addresses[placement.host]
        argv = [cfg.python, "-m", "psframework", "server", "--rank", str(placement.rank),
                "--scheduler", scheduler_address, "--bind", address]
        specs.append(_spec(cfg, placement, address, argv, scheduler_address))
    for placement in cfg.layout.workers:
        specs.append(_spec(cfg, placement, addresses[placement.host], list(cfg.command), scheduler_address))
    return specs


def _spec(cfg: LaunchConfig, placement: Placement, address: str, argv: list[str],
          scheduler_address: Optional[str]) -> ProcessSpec:
    local = cfg.runs_here(placement.host)
    # later entries win: forwarded (over ssh) < unbuffered, threads < -x < what defines the job;
    # srun passes its own environment (this host's) on, like a local process's
    env = dict(cfg.forward_env) if not local and cfg.launcher == "ssh" else {}
    env["PYTHONUNBUFFERED"] = "1"  # so the last lines before a crash reach the root-cause report
    threads = cfg.worker_threads_on(placement.host) if placement.role == "worker" else None
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    env.update(cfg.env)
    env.update(config_to_env(cfg.scheduler_config()))
    env.update(PS_JOB_ID=cfg.job_id, PS_ROLE=placement.role, PS_HOST=placement.host, PS_BIND=address)
    if cfg.secret_file and not local:
        env["PS_SECRET_FILE"] = remote_secret_path(cfg.secret_file, placement.host, placement.ssh_port)
        if cfg.launcher == "slurm":  # a copy per process, written and removed by its agent (remote_child)
            env["PS_SECRET_FILE"] = env["PS_SECRET_FILE"].rsplit("/", 1)[0] + f"/{_role_rank(placement)}.json"
    if placement.role != "scheduler":
        env["PS_RANK"] = str(placement.rank)
        env["PS_SCHEDULER"] = scheduler_address or ""
    if placement.role == "worker":
        env.update(cfg.worker_env())
    return ProcessSpec(role=placement.role, rank=placement.rank, host=placement.host, ssh_port=placement.ssh_port,
                       local=local, argv=tuple(argv), env=tuple(env.items()), launcher=cfg.launcher)


def _role_rank(placement: Placement) -> str:
    return placement.role if placement.role == "scheduler" else f"{placement.role}-{placement.rank}"


def _reachable_address(host: str, local: bool, bind: Optional[str]) -> str:
    if local and bind:
        return bind
    address = resolve(host)
    if _is_loopback(address):
        raise ConfigError(
            f"host {host!r} runs part of a multi-host job but is a loopback address, which the other "
            f"hosts cannot reach; name this machine by a reachable address in the hostfile, or pass --bind")
    return address


def resolve(host: str) -> str:
    """An IP address for ``host`` (IPv4 preferred); the name itself if it does not resolve here,
    e.g. an alias only the ssh config knows (the remote process then reports the failed bind)."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return host
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0]) if infos else host


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


__all__ = ["ProcessSpec", "host_addresses", "node_processes", "resolve", "scheduler_process"]
