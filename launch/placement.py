"""Decide which host runs the scheduler, each server and each worker of a job.

Example::

    >>> from launch.hostfile import parse_hostfile
    >>> hosts = parse_hostfile("node1 slots=2 servers=1\\nnode2 slots=2", "hosts.txt")
    >>> layout = plan_job(hosts, num_workers=3, num_servers=None, source="hosts.txt")
    >>> [(p.role, p.rank, p.host) for p in layout.all()]
    [('scheduler', 0, 'node1'), ('server', 0, 'node1'), ('worker', 0, 'node1'), ('worker', 1, 'node1'), ('worker', 2, 'node2')]
    >>> layout.hosts()
    ('node1', 'node2')

Workers fill the hosts' slots in file order; servers fill the declared ``servers=`` in file order,
or, when no host declares any, go round-robin over the hosts that have slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from .hostfile import HostEntry
from .hosts import split_host_port
from ..errors import ConfigError

LOCAL_SOURCE = "<local>"
_MAX_LISTED = 8  # hosts named in a capacity error before "..."


@dataclass(frozen=True)
class Placement:
    """One process of the job: its role, its rank within the role and where it runs."""

    role: str
    rank: int
    host: str
    ssh_port: int | None


@dataclass(frozen=True)
class JobLayout:
    """Where every process of a job runs; ``source`` names the hostfile (or ``<local>``) for messages."""

    scheduler: Placement
    servers: tuple[Placement, ...]
    workers: tuple[Placement, ...]
    source: str

    def all(self) -> tuple[Placement, ...]:
        """Every placement: the scheduler, then the servers, then the workers."""
        return (self.scheduler, *self.servers, *self.workers)

    def hosts(self) -> tuple[str, ...]:
        """The distinct hosts, in order of first appearance in all()."""
        return tuple(dict.fromkeys(p.host for p in self.all()))


def plan_job(hosts: Sequence[HostEntry] | None, num_workers: int | None, num_servers: int | None,
             scheduler_host: str | None = None, source: str = "<hostfile>",
             local_host: str = "127.0.0.1") -> JobLayout:
    """Place the scheduler, ``num_servers`` servers and ``num_workers`` workers on ``hosts``.

    ``hosts`` None means no hostfile: everything runs on ``local_host`` (default 1 worker, 1 server).
    Counts left None default to the hostfile's capacity. ConfigError when the counts do not fit.
    """
    _check_count(num_workers, "workers", "-n")
    _check_count(num_servers, "servers", "--num-servers")
    if hosts is None:
        return _plan_local(num_workers or 1, num_servers or 1, scheduler_host, local_host)
    hosts = tuple(hosts)
    if not hosts:
        raise ConfigError(f"{source}: no hosts to place the job on; add a line like 'node1 slots=4'")
    workers = _place_workers(hosts, num_workers, source)
    servers = _place_servers(hosts, num_servers, source)
    return JobLayout(scheduler=_place_scheduler(hosts, scheduler_host), servers=servers,
                     workers=workers, source=source)


def _check_count(count: int | None, what: str, option: str) -> None:
    if count is not None and count < 1:
        raise ConfigError(f"asked for {count} {what}; a job needs at least 1 (fix {option})")


def _plan_local(num_workers: int, num_servers: int, scheduler_host: str | None, local_host: str) -> JobLayout:
    scheduler = split_host_port(scheduler_host)[0] if scheduler_host else local_host
    return JobLayout(
        scheduler=Placement("scheduler", 0, scheduler, None),
        servers=tuple(Placement("server", r, local_host, None) for r in range(num_servers)),
        workers=tuple(Placement("worker", r, local_host, None) for r in range(num_workers)),
        source=LOCAL_SOURCE,
    )


def _place_workers(hosts: tuple[HostEntry, ...], num_workers: int | None, source: str) -> tuple[Placement, ...]:
    total = sum(h.slots for h in hosts)
    if total == 0:
        raise ConfigError(f"{source} offers no worker slots (every host has only servers=); "
                          f"give at least one host slots=N")
    wanted = total if num_workers is None else num_workers
    if wanted > total:
        raise ConfigError(f"asked for {wanted} workers but {source} offers {total} slots "
                          f"({_capacity(hosts, 'slots')}); add slots or lower -n")
    return _fill(hosts, "worker", wanted, lambda h: h.slots)


def _place_servers(hosts: tuple[HostEntry, ...], num_servers: int | None, source: str) -> tuple[Placement, ...]:
    declared = sum(h.servers for h in hosts)
    if declared == 0:
        # No servers= anywhere: spread servers over the worker hosts so no single NIC carries them all.
        wanted = 1 if num_servers is None else num_servers
        with_slots = [h for h in hosts if h.slots > 0]
        return tuple(_placement("server", r, with_slots[r % len(with_slots)]) for r in range(wanted))
    wanted = declared if num_servers is None else num_servers
    if wanted > declared:
        raise ConfigError(f"asked for {wanted} servers but {source} declares {declared} servers "
                          f"({_capacity(hosts, 'servers')}); add servers= to hosts or lower --num-servers")
    return _fill(hosts, "server", wanted, lambda h: h.servers)


def _fill(hosts: tuple[HostEntry, ...], role: str, count: int,
          capacity: Callable[[HostEntry], int]) -> tuple[Placement, ...]:
    placed: list[Placement] = []
    for host in hosts:
        for _ in range(min(capacity(host), count - len(placed))):
            placed.append(_placement(role, len(placed), host))
    return tuple(placed)


def _place_scheduler(hosts: tuple[HostEntry, ...], scheduler_host: str | None) -> Placement:
    if not scheduler_host:
        return _placement("scheduler", 0, hosts[0])
    # The port in --scheduler HOST:PORT is the scheduler's listening port; ssh uses the hostfile's.
    name = split_host_port(scheduler_host)[0]
    ssh_port = next((h.ssh_port for h in hosts if h.host == name), None)
    return Placement("scheduler", 0, name, ssh_port)


def _placement(role: str, rank: int, host: HostEntry) -> Placement:
    return Placement(role, rank, host.host, host.ssh_port)


def _capacity(hosts: tuple[HostEntry, ...], key: str) -> str:
    offering = [h for h in hosts if getattr(h, key) > 0]
    parts = [f"{h.address}: {getattr(h, key)}" for h in offering[:_MAX_LISTED]]
    if len(offering) > _MAX_LISTED:
        parts.append(f"... {len(offering) - _MAX_LISTED} more hosts")
    return ", ".join(parts)


__all__ = ["JobLayout", "Placement", "plan_job"]
