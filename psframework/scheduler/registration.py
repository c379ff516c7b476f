"""Registration: every worker registers the same tensors; the scheduler places them and sets the
servers up. A worker that joins an elastic job late is checked against the job's tensors and
activated on every server: a server that is dead is told once its new process joins, and the
register fails if the servers do not confirm in time or the job fails."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .. import protocol as P
from ..errors import PSError, RegistrationError
from ..sharding import TensorSpec, assign_shards
from ..tables import TableSpec
from .roster import DEAD, LIVE, Node, Roster

log = logging.getLogger("psframework.scheduler")

Send = Callable[[bytes, P.Message], None]


@dataclass
class _Activation:
    """A late worker's registration, until every server confirmed it may take part."""

    peer: bytes
    key: str  # sha256 of its token, for the servers
    pending: set[int]  # servers that have not confirmed
    deadline: float


class Registration:
    def __init__(self, roster: Roster, send: Send, barrier_seq: Callable[[], int]):
        self.roster = roster
        self._barrier_seq = barrier_seq  # the last barrier done, where a late worker starts counting
        self.config = roster.config
        self._send = send
        self._pending: dict[int, tuple[bytes, P.Register]] = {}  # rank -> its REGISTER, until set up
        self._setting_up: set[int] = set()  # servers that have not confirmed their blocks
        self.shard_map: Optional[dict] = None  # on the wire; None until registered
        self.optimizer: Optional[dict] = None
        self._reference: list[P.TensorInfo] = []
        self._initialiser = 0  # the worker whose values initialise the servers
        self._reference_tables: list[dict] = []
        self._late: set[int] = set()  # workers that joined a running job and have not registered
        self._activating: dict[int, _Activation] = {}  # late worker -> its activation

    @property
    def done(self) -> bool:
        return self.shard_map is not None

    def joined_late(self, worker: int) -> None:
        self._late.add(worker)

    def on_register(self, peer: bytes, message: P.Register) -> None:
        node = self.roster.node("worker", message.rank, peer)
        if self.done and node.rank not in self._late:
            raise P.Rejected(P.REGISTRATION, f"worker {node.rank}: tensors are already registered; "
                                             "register() may be called once per job")
        if self.done:
            self._activate(node, peer, message)
            return
        self._pending[node.rank] = (peer, message)
        self.recheck()

    def recheck(self) -> None:
        """Place the tensors once every live worker has registered, also when one leaves: an
        elastic job goes on with the others, any other job fails with an error naming it."""
        self._drop_gone_activations()
        if self.done or not self._pending or self._setting_up:
            return
        gone = [n for n in self.roster.workers() if n.state != LIVE and n.rank not in self._pending]
        if gone and not self.config.elastic:
            names = ", ".join(f"worker {n.rank} on {n.host}" for n in gone)
            self.fail(P.REGISTRATION, f"{names} left the job before registering; every worker of a job "
                                      "without --elastic must register the same tensors")
            return
        if len(self._pending) < self.roster.live_workers():
            return
        try:
            reference = self._check()
            specs = [TensorSpec(t.name, tuple(t.shape), t.dtype) for t in reference.tensors]
            tables = [TableSpec.from_wire(t) for t in reference.tables]
            shard_map = assign_shards(specs, self.config.num_servers,
                                      self.config.block_bytes(self._device_lanes_only()), tables)
        except PSError as exc:
            self.fail(P.REGISTRATION, str(exc))
            return
        self.shard_map, self.optimizer, self._reference = shard_map.to_wire(), reference.optimizer, reference.tensors
        self._reference_tables = reference.tables
        for rank in range(self.config.num_servers):
            self._send(self.roster.server(rank).identity, self.setup_message())
            self._setting_up.add(rank)
        log.info("registered %d tensors in %d blocks (server bytes %s) and %d tables", len(specs),
                 len(shard_map.blocks), shard_map.server_bytes(), len(tables))

    def _device_lanes_only(self) -> bool:
        """Every registered worker's tensors are on a GPU, and it shares its host with every server:
        all of them will exchange through device lanes (a worker whose lanes fail falls back to
        the shared-memory lane, which works with any block size)."""
        hosts = {self.roster.server(rank).host for rank in range(self.config.num_servers)}
        return len(hosts) == 1 and all(
            message.device_lanes and self.roster.node("worker", rank).host in hosts
            for rank, (_, message) in self._pending.items())

    def setup_message(self) -> P.Setup:
        return P.Setup(shard_map=self.shard_map, optimizer=self.optimizer)

    def _check(self) -> P.Register:
        # the lowest rank's values initialise the servers: worker 0's, unless it left an elastic
        # job before registering
        self._initialiser = first = min(self._pending)
        reference = self._pending[first][1]
        for rank, (_, message) in sorted(self._pending.items()):
            if message.optimizer != reference.optimizer:
                raise RegistrationError(
                    f"worker {rank} registered optimizer {message.optimizer} but worker {first} "
                    f"registered {reference.optimizer}; all workers must use the same one")
            mismatch = first_mismatch(reference.tensors, message.tensors) or table_mismatch(reference.tables,
                                                                                            message.tables)
            if mismatch:
                raise RegistrationError(f"worker {rank} and worker {first} registered different tensors: {mismatch}")
        return reference

    def on_setup_done(self, server: Node) -> None:
        self._setting_up.discard(server.rank)
        if self._setting_up:
            return
        for peer, _ in self._pending.values():
            self._send(peer, P.Registered(shard_map=self.shard_map, initialiser=self._initialiser))
        self._pending.clear()

    def fail(self, kind: str, message: str) -> None:
        """Answer every waiting registration with an error."""
        peers = [peer for peer, _ in self._pending.values()] + [a.peer for a in self._activating.values()]
        for peer in peers:
            self._send(peer, P.Error(kind=kind, message=message))
        self._pending.clear()
        self._activating.clear()

    # -- late workers --------------------------------------------------------------------

    def _activate(self, node: Node, peer: bytes, message: P.Register) -> None:
        """Check a late worker's tensors, then let the servers count it from their current step on."""
        mismatch = first_mismatch(self._reference, message.tensors) or table_mismatch(self._reference_tables,
                                                                                      message.tables)
        if mismatch:
            self._send(peer, P.Error(kind=P.REGISTRATION, message=f"worker {node.rank} registered different "
                                                                  f"tensors than the job: {mismatch}"))
            return
        self._late.discard(node.rank)
        servers = range(self.config.num_servers)
        self._activating[node.rank] = _Activation(peer, P.token_key(node.token), set(servers), self._deadline())
        for rank in servers:
            self._tell(self.roster.server(rank), node.rank)

    def _tell(self, server: Node, worker: int) -> None:
        if server.state != DEAD:  # else its new process is told when it joins (server_back)
            activation = self._activating[worker]
            self._send(server.identity, P.Activate(worker=worker, epoch=self.roster.epoch, key=activation.key))

    @property
    def _patience(self) -> float:
        # a stopped server is declared dead within the heartbeat timeout, and must be back within the start timeout
        return self.config.timing.heartbeat_timeout + self.config.timing.start_timeout

    def _deadline(self) -> float:
        return time.monotonic() + self._patience

    def server_back(self, server: Node) -> None:
        """A server's new process joined: the activations its old one never confirmed go to it (after its
        Setup, so it holds its blocks by then)."""
        for worker, activation in self._activating.items():
            if server.rank in activation.pending:
                activation.deadline = self._deadline()
                self._tell(server, worker)

    def on_activated(self, server: Node, message: P.Activated) -> None:
        activation = self._activating.get(message.worker)
        if activation is None or server.state == DEAD:  # its new process is asked again (server_back)
            return
        activation.pending.discard(server.rank)
        if not activation.pending:
            del self._activating[message.worker]
            self._send(activation.peer, P.Registered(shard_map=self.shard_map, joined=True,
                                                     barrier_seq=self._barrier_seq()))
            log.info("worker %d takes part again from the servers' next step", message.worker)

    def expire(self, now: float) -> None:
        """Fail the register of a late worker whose activation some server did not confirm in time; it
        may register again."""
        for worker, activation in list(self._activating.items()):
            if now <= activation.deadline:
                continue
            del self._activating[worker]
            self._late.add(worker)
            names = ", ".join(f"{self.roster.server(r)} ({self.roster.server(r).state})"
                              for r in sorted(activation.pending))
            message = (f"worker {worker}: register() cannot complete: {names} did not confirm that this worker "
                       f"takes part within {self._patience:g} s; check that server's output, and call register() "
                       "again once it is back")
            log.error("%s", message)
            self._send(activation.peer, P.Error(kind=P.TIMEOUT, message=message))

    def _drop_gone_activations(self) -> None:
        """A late worker that died or left while activated: no server need hear of it any more."""
        for worker, activation in list(self._activating.items()):
            if self.roster.not_counted("worker", worker, activation.peer):
                del self._activating[worker]



def first_mismatch(reference: list[P.TensorInfo], other: list[P.TensorInfo]) -> str:
    """How ``other``'s tensors differ from worker 0's ``reference``; empty if they do not."""
    ref = {t.name: t for t in reference}
    oth = {t.name: t for t in other}
    for name in ref:
        if name not in oth:
            return f"{name!r} is missing (worker 0 has it)"
    for name in oth:
        if name not in ref:
            return f"{name!r} is not registered by worker 0"
    for name, t in ref.items():
        o = oth[name]
        if o.shape != t.shape:
            return f"{name!r} has shape {tuple(o.shape)}, worker 0 has {tuple(t.shape)}"
        if o.dtype != t.dtype:
            return f"{name!r} has dtype {o.dtype}, worker 0 has {t.dtype}"
    if [t.name for t in reference] != [t.name for t in other]:
        return "the same tensors were registered in a different order"
    return ""


def table_mismatch(reference: list[dict], other: list[dict]) -> str:
    """How ``other``'s embedding tables differ from worker 0's; empty if they do not."""
    ref = {t.get("name"): t for t in reference}
    oth = {t.get("name"): t for t in other}
    for name in ref.keys() ^ oth.keys():
        return f"table {name!r} is registered by {'worker 0 only' if name in ref else 'it, not by worker 0'}"
    for name, t in ref.items():
        if oth[name] != t:
            field = next(k for k in sorted(t.keys() | oth[name].keys()) if t.get(k) != oth[name].get(k))
            return f"table {name!r} has {field} {oth[name].get(field)!r}, worker 0 has {t.get(field)!r}"
    return ""


__all__ = ["Registration", "first_mismatch", "table_mismatch"]
