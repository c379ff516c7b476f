"""Who is in the job: hellos before the start, ranks, heartbeats, deaths, departures and rejoins.

The roster only records; what a death means for the job (elastic, restartable, fatal) is the
scheduler's decision (``scheduler/__init__.py``).
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Optional

from .. import protocol as P
from ..config import SchedulerConfig

log = logging.getLogger("psframework.scheduler")

ROLES = ("server", "worker")
LIVE, DEAD, LEFT, RESTORING = "live", "dead", "left", "restoring"


@dataclass
class Node:
    role: str
    rank: int
    host: str
    pid: int
    address: str
    identity: bytes  # its control socket, the only one it may speak for itself on
    last_seen: float = field(default_factory=time.monotonic)
    state: str = LIVE
    reason: str = ""
    fatal: bool = True  # a dead node the job cannot survive (not elastic, not restartable)
    deadline: float = 0.0  # a restartable server must be back by then
    stats: dict = field(default_factory=dict)
    token: str = field(default_factory=lambda: secrets.token_hex(16))  # given to it alone, in its welcome

    def info(self) -> P.NodeInfo:
        return P.NodeInfo(self.role, self.rank, self.host, self.pid, self.reason)

    def __str__(self) -> str:
        return describe(self.info())


def describe(info: P.NodeInfo) -> str:
    return f"{info.role} {info.rank} on host {info.host} (pid {info.pid})"


class Roster:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.hellos: list[tuple[bytes, P.Hello]] = []  # until everyone is here
        self.nodes: dict[tuple[str, int], Node] = {}
        self.epoch = 0  # bumped on every membership change; lets nodes drop stale heartbeat answers
        self._published: list[str] = []  # server addresses workers send to
        self.reader_key = secrets.token_hex(32)  # readers' tokens are made with it (protocol.reader_token)

    @property
    def running(self) -> bool:
        return bool(self.nodes)

    def expected(self, role: str) -> int:
        return self.config.num_servers if role == "server" else self.config.num_workers

    # -- the start -----------------------------------------------------------------------

    def admit(self, peer: bytes, hello: P.Hello) -> bool:
        """Take a hello before the job runs; True once every expected node said hello."""
        role, rank = hello.role, hello.rank
        if rank is not None and not 0 <= rank < self.expected(role):
            raise P.Rejected(P.CONFIG, f"{role} rank {rank} is out of range 0..{self.expected(role) - 1}")
        same_role = [h for _, h in self.hellos if h.role == role]
        if rank is not None and any(h.rank == rank for h in same_role):
            raise P.Rejected(P.CONFIG, f"two {role}s asked for rank {rank}")
        if len(same_role) >= self.expected(role):
            raise P.Rejected(P.CONFIG, f"the job expects {self.expected(role)} {role}s; one more arrived "
                                       f"from {hello.host}")
        self.hellos.append((peer, hello))
        log.info("%s from %s (pid %s) joined (%d/%d servers, %d/%d workers)", role, hello.host, hello.pid,
                 *self.counts())
        return len(self.hellos) == self.config.num_servers + self.config.num_workers

    def counts(self) -> tuple[int, int, int, int]:
        servers = sum(1 for _, h in self.hellos if h.role == "server")
        workers = len(self.hellos) - servers
        return servers, self.config.num_servers, workers, self.config.num_workers

    def assign_ranks(self) -> list[Node]:
        """Every node that said hello, with its rank: the one it asked for, else the lowest free."""
        for role in ROLES:
            hellos = [(p, h) for p, h in self.hellos if h.role == role]
            taken = {h.rank for _, h in hellos if h.rank is not None}
            free = iter(r for r in range(self.expected(role)) if r not in taken)
            for peer, h in hellos:
                rank = h.rank if h.rank is not None else next(free)
                self.nodes[(role, rank)] = Node(role, rank, h.host, h.pid, h.address, peer)
        self.hellos.clear()
        return list(self.nodes.values())

    def welcome(self, node: Node) -> P.Welcome:
        c = self.config
        keys = {n.rank: P.token_key(n.token) for n in self.workers()} if node.role == "server" else {}
        return P.Welcome(rank=node.rank, num_workers=c.num_workers, num_servers=c.num_servers, mode=c.mode,
                         staleness=c.staleness, servers=self.server_addresses(),
                         heartbeat_interval=c.timing.heartbeat_interval,
                         heartbeat_timeout=c.timing.heartbeat_timeout, chunk_bytes=c.block_bytes(),
                         host=c.host, version=P.VERSION, server_device=c.server_device, elastic=c.elastic,
                         token=node.token, worker_keys=keys, max_message_bytes=c.max_message_bytes,
                         reader_key=self.reader_key if node.role == "server" else "")

    # -- lookups -------------------------------------------------------------------------

    def node(self, role: str, rank: int, peer: Optional[bytes] = None) -> Node:
        """The node a message claims to come from; with ``peer``, it must come from that node's
        own control socket, so nobody can act on another node's behalf."""
        node = self.nodes.get((role, rank))
        if node is None:
            raise P.Rejected(P.PROTOCOL, f"message from unknown node {role} {rank}")
        if peer is not None and peer != node.identity:
            raise P.Rejected(P.PROTOCOL, f"a message for {role} {rank} from a socket that is not its own")
        return node

    def live_node(self, role: str, rank: int, peer: bytes) -> Node:
        """``node()``, refused if the scheduler no longer counts that node in the job."""
        node = self.node(role, rank, peer)
        why = self.not_counted(role, rank, peer)
        if why:
            raise P.Rejected(P.PEER_LOST, why)
        return node

    def not_counted(self, role: str, rank: int, peer: bytes) -> str:
        """Why the node of that rank speaking on ``peer`` is out of the job (it died or left, or another
        process has its rank now); empty if it is in."""
        node = self.nodes[(role, rank)]
        if node.identity != peer:
            gone = "was declared dead; another process has its rank now"
        elif node.state != LIVE:
            gone = f"was declared dead ({node.reason})" if node.state == DEAD else f"is {node.state}"
        else:
            return ""
        return f"{role} {rank} {gone}; the job went on without it: end this process (a new {role} may take its place)"

    def by_identity(self, peer: bytes) -> Node:
        for node in self.nodes.values():
            if node.identity == peer:
                return node
        raise P.Rejected(P.PROTOCOL, "message from a peer that never said hello")

    def workers(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.role == "worker"]

    def live_workers(self) -> int:
        return sum(1 for n in self.workers() if n.state == LIVE)

    def server(self, rank: int) -> Node:
        return self.nodes[("server", rank)]

    # -- liveness ------------------------------------------------------------------------

    def heartbeat(self, beat: P.Heartbeat, shutdown: bool, rollback: tuple[int, int]) -> P.HeartbeatAck:
        node = self.node(beat.role, beat.rank)
        if not secrets.compare_digest(beat.token, node.token):
            raise P.Rejected(P.PROTOCOL, f"a heartbeat claims to be {node.role} {node.rank} without its token")
        if node.state in (LIVE, RESTORING):
            node.last_seen = time.monotonic()
            node.stats = dict(beat.stats)
        workers = self.workers()
        return P.HeartbeatAck(
            epoch=self.epoch, servers=self.server_addresses(),
            dead=[n.info() for n in self.nodes.values() if n.state == DEAD and n.fatal],
            left=sorted(n.rank for n in workers if n.state == LEFT),
            departed=sorted(n.rank for n in workers if n.state == DEAD and not n.fatal),
            shutdown=shutdown, rollback=rollback[0], rollback_step=rollback[1])

    def silent(self, now: float) -> list[Node]:
        """Live nodes whose heartbeats stopped."""
        timeout = self.config.timing.heartbeat_timeout
        return [n for n in self.nodes.values() if n.state in (LIVE, RESTORING) and now - n.last_seen > timeout]

    def mark(self, node: Node, state: str, reason: str = "") -> None:
        self.epoch += 1
        node.state = state
        if reason:
            node.reason = reason

    def server_addresses(self) -> list[str]:
        """Where workers send requests. A restarted server is published only once its shards are
        restored, so nothing lands on it before its checkpoint does."""
        if not self._published:
            self._published = [self.server(r).address for r in range(self.config.num_servers)]
        return list(self._published)

    def publish(self, server: Node) -> None:
        self._published[server.rank] = server.address
        self.epoch += 1

    # -- rejoining -----------------------------------------------------------------------

    def free_ranks(self, role: str) -> list[int]:
        """Ranks a newcomer may take: those of nodes that died survivably, or workers that left."""
        return sorted(n.rank for n in self.nodes.values() if n.role == role and (
            (n.state == DEAD and not n.fatal) or (role == "worker" and n.state == LEFT)))

    def rejoin(self, peer: bytes, hello: P.Hello, restoring: bool) -> Node:
        """A node that arrives while the job runs takes a free rank (or the one it asked for)."""
        role, rank = hello.role, hello.rank
        free = self.free_ranks(role)
        if rank is None and role == "worker" and free:
            rank = min(free)
        if rank not in free:
            raise P.Rejected(P.CONFIG, f"no free {role} slot for {hello.host}: {role} ranks in use; a {role} may "
                                       f"take the place of one that died (free: {free})")
        self.epoch += 1
        node = Node(role, rank, hello.host, hello.pid, hello.address, peer)
        node.state = RESTORING if restoring else LIVE
        self.nodes[(role, rank)] = node
        log.warning("%s rejoined the job", node)
        return node

    def replaced(self, hello: P.Hello) -> Optional[Node]:
        """A live server that a new process for its rank replaces (a launcher restarts a server as
        soon as it exits, before its heartbeats time out)."""
        current = self.nodes.get((hello.role, hello.rank)) if hello.role == "server" else None
        if current is not None and current.state in (LIVE, RESTORING) and \
                (current.pid, current.host) != (hello.pid, hello.host):
            return current
        return None


class ServerClaims:
    """Hellos of new processes for the rank of a server that still heartbeats. A launcher restarts
    a server as soon as it exits, before its heartbeats time out, so a new process replaces a
    server that went silent at once; but no member of the job may take the rank of a server that
    lives. A claim is held until the old process has been silent for two heartbeat intervals
    (then it is admitted) or, while it keeps heartbeating, for the heartbeat timeout (refused)."""

    def __init__(self, config: SchedulerConfig):
        self.timing = config.timing
        self._held: dict[bytes, tuple[P.Hello, float]] = {}

    def still_heartbeats(self, node: Node, now: float) -> bool:
        return now - node.last_seen < 2 * self.timing.heartbeat_interval

    def hold(self, peer: bytes, hello: P.Hello, now: float) -> None:
        self._held[peer] = (hello, now)

    def decide(self, roster: Roster, now: float) -> tuple[list, list]:
        """The held claims to admit now ``[(peer, hello)]``, and those to refuse
        ``[(peer, hello, the live server)]``."""
        admit, refuse = [], []
        for peer, (hello, since) in list(self._held.items()):
            current = roster.replaced(hello)
            if current is None or not self.still_heartbeats(current, now):
                admit.append((peer, hello))
            elif now - since > self.timing.heartbeat_timeout:
                refuse.append((peer, hello, current))
            else:
                continue
            del self._held[peer]
        return admit, refuse


__all__ = ["DEAD", "LEFT", "LIVE", "RESTORING", "ROLES", "Node", "Roster", "ServerClaims", "describe"]
