"""The scheduler role: membership, ranks, the shard map, barriers, heartbeats and the job's mode.

Every server and worker says hello; once all expected nodes are there the scheduler welcomes
them with their ranks, the servers' addresses and the mode. It then checks that all workers
register the same tensors, computes the shard map, hands the servers their blocks, runs
barriers, and declares dead any node whose heartbeats stop. It exits when every worker has
closed (exit 0) or the job cannot go on (exit 1).

Run one with ``python -m psframework scheduler`` (ps-launch does this for you). Besides its log
(stderr) it prints lines for the launcher on stdout: ``PS_SCHEDULER_ADDRESS=tcp://H:P`` once
listening, ``PS_JOINED role=R rank=N host=H`` per node that said hello, ``PS_CLUSTER_UP`` once all
joined.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import checkpoint
from . import protocol as P
from .config import SchedulerConfig
from .errors import ProtocolError, PSError, RegistrationError
from .node import POLL_SLICE, RateLimitedLog, describe
from .sharding import TensorSpec, assign_shards
from .security import load_secret
from .transport import Transport, ZmqTransport

log = logging.getLogger("psframework.scheduler")

ROLES = ("server", "worker")


@dataclass
class _Node:
    role: str
    rank: int
    host: str
    pid: int
    address: str
    identity: bytes
    last_seen: float = field(default_factory=time.monotonic)
    state: str = "live"  # live | dead | left | restoring
    reason: str = ""
    fatal: bool = True  # a dead node the job cannot survive (not elastic / not restartable)
    deadline: float = 0.0  # a restartable server must be back by then
    stats: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"role": self.role, "rank": self.rank, "host": self.host, "pid": self.pid, "reason": self.reason}


class _Reject(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Scheduler:
    def __init__(self, config: SchedulerConfig, transport: Optional[Transport] = None):
        self.config = config
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self.socket = self.transport.listen(config.bind_host, config.port,
                                            max_message_bytes=config.max_message_bytes)
        self.address = self.socket.address
        self._hellos: list[tuple[bytes, dict]] = []
        self.nodes: dict[tuple[str, int], _Node] = {}
        self._started_at = time.monotonic()
        self._running = False
        self._registrations: dict[int, tuple[bytes, dict]] = {}
        self._setup_waiting: set[int] = set()
        self._shard_map_wire: Optional[dict] = None
        self._optimizer_wire: Optional[dict] = None
        self._barriers: dict[int, dict[int, bytes]] = {}
        self._collecting: dict[str, dict[int, tuple[bytes, dict]]] = {P.CHECKPOINT: {}, P.RESTORE: {}}
        self._storage: Optional[_StorageOp] = None
        self._barrier_seq_done = 0
        self._published_servers: list[str] = []
        self._epoch = 0  # bumped whenever membership changes; lets nodes drop stale heartbeat answers
        self._restoring: dict[int, str] = {}  # restarted server rank -> "setup" | "load"
        self._activating: dict[int, tuple[bytes, set[int]]] = {}  # rejoined worker -> (peer, servers pending)
        self._last_checkpoint_dir: Optional[str] = None
        self._joined_late: set[int] = set()
        self._reference_tensors: list[dict] = []
        self._shutdown_at: Optional[float] = None
        self._failed = False
        self._garbage_log = RateLimitedLog(log)

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the job is over; returns the exit code."""
        try:
            while True:
                if self.transport.poll([self.socket], POLL_SLICE):
                    self._drain()
                now = time.monotonic()
                if not self._running:
                    self._check_start_deadline(now)
                else:
                    self._check_heartbeats(now)
                if self._shutdown_at is not None and now >= self._shutdown_at:
                    return 1 if self._failed else 0
        except _StartFailed:
            return 1
        finally:
            self.close()

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def _drain(self) -> None:
        for _ in range(256):
            if not self.transport.poll([self.socket], 0):
                return
            peer, header = None, None
            try:
                peer, head = self.socket.recv_header()
                self.socket.skip_rest()
                header = P.unpack_header(head)
                self._handle(peer, header)
            except ProtocolError as exc:
                self._garbage_log.warning("dropped malformed message from %r: %s", peer, exc)
            except _Reject as exc:
                self._garbage_log.warning("rejected %s from %r: %s", header and header.get("op"), peer, exc)
                self._reply(peer, P.error_header(exc.kind, str(exc)))
            except (KeyError, TypeError, ValueError) as exc:
                self._garbage_log.warning("dropped bad %s message from %r: %r", header and header.get("op"), peer, exc)

    def _reply(self, peer: bytes, header: dict) -> None:
        self.socket.send([P.pack_header(header)], peer=peer)

    def _handle(self, peer: bytes, header: dict) -> None:
        handler = {
            P.HELLO: self._on_hello,
            P.HEARTBEAT: self._on_heartbeat,
            P.REGISTER: self._on_register,
            P.SETUP_DONE: self._on_setup_done,
            P.BARRIER: self._on_barrier,
            P.BYE: self._on_bye,
            P.CHECKPOINT: self._on_collective,
            P.RESTORE: self._on_collective,
            P.SAVED: self._on_server_done,
            P.LOADED: self._on_server_done,
            P.ERROR: self._on_server_error,
            P.ACTIVATED: self._on_activated,
        }.get(header["op"])
        if handler is None:
            raise _Reject(P.PROTOCOL, f"the scheduler does not handle op {header['op']!r}")
        handler(peer, header)

    # -- joining -------------------------------------------------------------------------

    def _expected(self, role: str) -> int:
        return self.config.num_servers if role == "server" else self.config.num_workers

    def _on_hello(self, peer: bytes, header: dict) -> None:
        role, rank = header.get("role"), header.get("rank")
        if role not in ROLES:
            raise _Reject(P.PROTOCOL, f"hello from unknown role {role!r}")
        if self._running:
            self._on_rejoin(peer, header)
            return
        if rank is not None and not (isinstance(rank, int) and 0 <= rank < self._expected(role)):
            raise _Reject("config", f"{role} rank {rank!r} is out of range 0..{self._expected(role) - 1}")
        same_role = [h for _, h in self._hellos if h["role"] == role]
        if rank is not None and any(h.get("rank") == rank for h in same_role):
            raise _Reject("config", f"two {role}s asked for rank {rank}")
        if len(same_role) >= self._expected(role):
            raise _Reject("config", f"the job expects {self._expected(role)} {role}s; one more arrived "
                                    f"from {header.get('host')}")
        if role == "server" and not header.get("address"):
            raise _Reject(P.PROTOCOL, "a server's hello must carry its data address")
        self._hellos.append((peer, header))
        log.info("%s from %s (pid %s) joined (%d/%d servers, %d/%d workers)", role, header.get("host"),
                 header.get("pid"), *self._counts())
        tell_launcher(f"PS_JOINED role={role} rank={'-' if rank is None else rank} host={header.get('host')}")
        if len(self._hellos) == self.config.num_servers + self.config.num_workers:
            self._welcome_all()

    def _counts(self) -> tuple[int, int, int, int]:
        servers = sum(1 for _, h in self._hellos if h["role"] == "server")
        workers = len(self._hellos) - servers
        return servers, self.config.num_servers, workers, self.config.num_workers

    def _welcome_all(self) -> None:
        for role in ROLES:
            hellos = [(p, h) for p, h in self._hellos if h["role"] == role]
            taken = {h["rank"] for _, h in hellos if h.get("rank") is not None}
            free = iter(r for r in range(self._expected(role)) if r not in taken)
            for peer, h in hellos:
                rank = h["rank"] if h.get("rank") is not None else next(free)
                self.nodes[(role, rank)] = _Node(role, rank, str(h.get("host", "?")), int(h.get("pid", 0)),
                                                 str(h.get("address", "")), peer)
        common = self._welcome_common()
        for node in self.nodes.values():
            node.last_seen = time.monotonic()
            self._reply(node.identity, {**common, "rank": node.rank})
        self._running = True
        log.info("all %d servers and %d workers joined; mode %s", self.config.num_servers,
                 self.config.num_workers, self.config.mode)
        tell_launcher("PS_CLUSTER_UP")

    def _welcome_common(self) -> dict:
        return {
            "op": P.WELCOME, "num_workers": self.config.num_workers, "num_servers": self.config.num_servers,
            "mode": self.config.mode, "staleness": self.config.staleness, "servers": self._server_addresses(),
            "heartbeat_interval": self.config.timing.heartbeat_interval,
            "heartbeat_timeout": self.config.timing.heartbeat_timeout,
            "server_device": self.config.server_device, "chunk_bytes": self.config.chunk_bytes,
            "elastic": self.config.elastic,
        }

    def _check_start_deadline(self, now: float) -> None:
        if now - self._started_at <= self.config.timing.start_timeout:
            return
        servers, want_s, workers, want_w = self._counts()
        joined = ", ".join(f"{h['role']} from {h.get('host')}" for _, h in self._hellos) or "nobody"
        message = (f"the cluster did not come up within {self.config.timing.start_timeout} s: "
                   f"{servers} of {want_s} servers and {workers} of {want_w} workers registered "
                   f"(joined: {joined}); check the missing processes' output")
        log.error(message)
        for peer, _ in self._hellos:
            self._reply(peer, P.error_header(P.TIMEOUT, message))
        raise _StartFailed(message)

    # -- liveness ------------------------------------------------------------------------

    def _node_for(self, header: dict, peer: Optional[bytes] = None) -> _Node:
        """The node a message claims to come from; with ``peer``, it must come from that node's
        own control socket, so nobody can join a barrier or leave on another node's behalf."""
        node = self.nodes.get((header.get("role"), header.get("rank")))
        if node is None:
            raise _Reject(P.PROTOCOL, f"message from unknown node {header.get('role')} {header.get('rank')}")
        if peer is not None and peer != node.identity:
            raise _Reject(P.PROTOCOL, f"{header['op']} for {node.role} {node.rank} from a socket that is not its own")
        return node

    def _on_heartbeat(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header)
        if node.state in ("live", "restoring"):
            node.last_seen = time.monotonic()
            if isinstance(header.get("stats"), dict):
                node.stats = header["stats"]
        workers = [n for n in self.nodes.values() if n.role == "worker"]
        self._reply(peer, {
            "op": P.HEARTBEAT_ACK,
            "dead": [n.info() for n in self.nodes.values() if n.state == "dead" and n.fatal],
            "left": sorted(n.rank for n in workers if n.state == "left"),
            "departed": sorted(n.rank for n in workers if n.state == "dead" and not n.fatal),
            "servers": self._server_addresses(),
            "epoch": self._epoch,
            "shutdown": self._shutdown_at is not None,
        })

    def _server_addresses(self) -> list[str]:
        """Where workers send requests. A restarted server is announced only once its shards are
        restored, so nothing lands on it before its checkpoint does."""
        if not self._published_servers:
            self._published_servers = [self.nodes[("server", r)].address for r in range(self.config.num_servers)]
        return list(self._published_servers)

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.config.timing.heartbeat_timeout
        for node in list(self.nodes.values()):
            if node.state in ("live", "restoring") and now - node.last_seen > timeout:
                self._declare_dead(node, f"no heartbeat for {now - node.last_seen:.1f} s")
            elif node.state == "dead" and not node.fatal and node.role == "server" and now > node.deadline:
                node.fatal = True
                node.reason += f"; it was not restarted within {self.config.timing.start_timeout} s"
                self._job_failed(node)

    def _declare_dead(self, node: _Node, reason: str) -> None:
        self._epoch += 1
        node.state, node.reason = "dead", reason
        if node.role == "worker" and self.config.elastic:
            node.fatal = False
            log.warning("%s is gone (%s); elastic: the others go on without it", describe(node.info()), reason)
            self._recheck_collectives()
        elif node.role == "server" and self.config.restart_servers and self._checkpoint_dir() is not None:
            node.fatal = False
            node.deadline = time.monotonic() + self.config.timing.start_timeout
            log.warning("%s is dead (%s); waiting for its restart", describe(node.info()), reason)
        else:
            if node.role == "server" and self.config.restart_servers:
                node.reason += "; it cannot be restarted: no checkpoint directory (set --checkpoint-dir)"
            self._job_failed(node)
        self._maybe_finish()

    def _job_failed(self, node: _Node) -> None:
        self._failed = True
        log.error("%s is dead: %s", describe(node.info()), node.reason)
        self._fail_waits(node)

    def _fail_waits(self, dead: _Node) -> None:
        message = f"{describe(dead.info())} died ({dead.reason})"
        for seq, waiting in list(self._barriers.items()):
            for peer in waiting.values():
                self._reply(peer, P.error_header(P.PEER_LOST, f"barrier {seq} cannot complete: {message}"))
            del self._barriers[seq]
        for peer, _ in self._registrations.values():
            self._reply(peer, P.error_header(P.PEER_LOST, f"register cannot complete: {message}"))
        self._registrations.clear()
        waits = [w for w in self._collecting.values() if w] + ([self._storage.waiting] if self._storage else [])
        for waiting in waits:
            self._answer_all(waiting, P.error_header(P.PEER_LOST, f"checkpoint cannot complete: {message}"))
        self._collecting = {P.CHECKPOINT: {}, P.RESTORE: {}}
        self._storage = None

    def _maybe_finish(self) -> None:
        workers = [n for n in self.nodes.values() if n.role == "worker"]
        if self._shutdown_at is None and all(n.state != "live" for n in workers):
            # linger for a few heartbeats so every server hears that the job is over
            self._shutdown_at = time.monotonic() + 3 * self.config.timing.heartbeat_interval
            log.info("all workers are done; shutting the job down")

    # -- registration --------------------------------------------------------------------

    def _on_register(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header, peer)
        if self._shard_map_wire is not None and node.rank not in self._joined_late:
            raise _Reject(P.REGISTRATION, f"worker {node.rank}: tensors are already registered; "
                                          "register() may be called once per job")
        if self._shard_map_wire is not None:
            self._activate(node, peer, header)
            return
        self._registrations[node.rank] = (peer, header)
        if len(self._registrations) < self._live_workers():
            return
        try:
            self._check_registrations()
            specs = [TensorSpec.from_wire(t) for t in self._registrations[0][1]["tensors"]]
            shard_map = assign_shards(specs, self.config.num_servers, self.config.chunk_bytes)
        except PSError as exc:
            for p, _ in self._registrations.values():
                self._reply(p, P.error_header(P.REGISTRATION, str(exc)))
            self._registrations.clear()
            return
        self._shard_map_wire = shard_map.to_wire()
        self._reference_tensors = self._registrations[0][1]["tensors"]
        optimizer = self._optimizer_wire = self._registrations[0][1]["optimizer"]
        for rank in range(self.config.num_servers):
            node = self.nodes[("server", rank)]
            self._reply(node.identity, {"op": P.SETUP, "shard_map": self._shard_map_wire, "optimizer": optimizer})
            self._setup_waiting.add(rank)
        log.info("registered %d tensors in %d blocks; server bytes %s", len(specs), len(shard_map.blocks),
                 shard_map.server_bytes())

    def _live_workers(self) -> int:
        return sum(1 for n in self.nodes.values() if n.role == "worker" and n.state == "live")

    def _check_registrations(self) -> None:
        if 0 not in self._registrations:
            raise RegistrationError("worker 0 did not register; its values initialise the servers")
        reference = self._registrations[0][1]
        ref_tensors = reference["tensors"]
        for rank, (_, header) in sorted(self._registrations.items()):
            if header.get("optimizer") != reference.get("optimizer"):
                raise RegistrationError(
                    f"worker {rank} registered optimizer {header.get('optimizer')} but worker 0 "
                    f"registered {reference.get('optimizer')}; all workers must use the same one")
            mismatch = _first_mismatch(ref_tensors, header["tensors"])
            if mismatch:
                raise RegistrationError(f"worker {rank} and worker 0 registered different tensors: {mismatch}")

    def _on_setup_done(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header) if "role" in header else self._node_by_identity(peer)
        if self._restoring.get(node.rank) == "setup":
            self._restore_server(node)
            return
        self._setup_waiting.discard(node.rank)
        if self._setup_waiting:
            return
        for p, _ in self._registrations.values():
            self._reply(p, {"op": P.REGISTERED, "shard_map": self._shard_map_wire})
        self._registrations.clear()

    def _node_by_identity(self, peer: bytes) -> _Node:
        for node in self.nodes.values():
            if node.identity == peer:
                return node
        raise _Reject(P.PROTOCOL, "message from a peer that never said hello")

    # -- barriers and leaving ------------------------------------------------------------

    def _on_barrier(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header, peer)
        seq = int(header["seq"])
        self._barriers.setdefault(seq, {})[node.rank] = peer
        self._recheck_collectives()

    def _recheck_collectives(self) -> None:
        """Release barriers, and start checkpoints, that every live worker has now reached
        (called on arrival and whenever a worker leaves or dies)."""
        live = self._live_workers()
        for seq, waiting in sorted(self._barriers.items()):
            if waiting and len(waiting) >= live:
                for p in waiting.values():
                    self._reply(p, {"op": P.BARRIER_DONE, "seq": seq})
                del self._barriers[seq]
                self._barrier_seq_done = max(self._barrier_seq_done, seq)
        for op, start in ((P.CHECKPOINT, self._start_checkpoint), (P.RESTORE, self._start_restore)):
            waiting = self._collecting[op]
            if waiting and len(waiting) >= live and self._storage is None:
                self._collecting[op] = {}
                start(waiting)

    def _on_bye(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header, peer)
        if node.state == "live":
            self._epoch += 1
            node.state = "left"
            log.info("worker %d on %s finished", node.rank, node.host)
        self._reply(peer, {"op": P.BYE_ACK})
        self._recheck_collectives()
        self._maybe_finish()

    # -- rejoining -----------------------------------------------------------------------

    def _free_ranks(self, role: str) -> list[int]:
        """Ranks a newcomer may take: those of nodes that died survivably, or workers that left."""
        return sorted(n.rank for n in self.nodes.values() if n.role == role and (
            (n.state == "dead" and not n.fatal) or (role == "worker" and n.state == "left")))

    def _checkpoint_dir(self) -> Optional[str]:
        return self.config.checkpoint_dir or self._last_checkpoint_dir

    def _on_rejoin(self, peer: bytes, header: dict) -> None:
        role, rank, host = header.get("role"), header.get("rank"), header.get("host")
        allowed = self.config.elastic if role == "worker" else self.config.restart_servers
        if not allowed:
            raise _Reject("config", f"the job is already running; {role} on {host} arrived too late "
                                    f"(start the job with --{'elastic' if role == 'worker' else 'restart-failed-servers'} "
                                    "to let nodes join later)")
        current = self.nodes.get((role, rank))
        if (role == "server" and current is not None and current.state in ("live", "restoring")
                and (current.pid, current.host) != (header.get("pid"), header.get("host"))):
            # a new process for this rank means the old one is gone, even if its heartbeats have not
            # timed out yet (a launcher restarts a server as soon as it exits)
            self._declare_dead(current, f"replaced by a new server process (pid {header.get('pid')})")
        free = self._free_ranks(role)
        if rank is None and role == "worker" and free:
            rank = min(free)
        if rank not in free:
            raise _Reject("config", f"no free {role} slot for {host}: {role} ranks in use; a {role} may take "
                                    f"the place of one that died (free: {sorted(free)})")
        if role == "server" and not header.get("address"):
            raise _Reject(P.PROTOCOL, "a server's hello must carry its data address")
        self._epoch += 1
        node = _Node(role, rank, str(host), int(header.get("pid", 0)), str(header.get("address", "")), peer)
        node.state = "restoring" if role == "server" and self._shard_map_wire is not None else "live"
        self.nodes[(role, rank)] = node
        if role == "worker":
            self._joined_late.add(rank)
        self._reply(peer, {**self._welcome_common(), "rank": rank})
        log.warning("%s rejoined the job", describe(node.info()))
        if node.state == "restoring":
            self._reply(peer, {"op": P.SETUP, "shard_map": self._shard_map_wire, "optimizer": self._optimizer_wire})
            self._restoring[rank] = "setup"

    def _activate(self, node: _Node, peer: bytes, header: dict) -> None:
        """A worker that joined late registers: check its tensors, then let the servers count it
        from their current step on."""
        mismatch = _first_mismatch(self._reference_tensors, header.get("tensors", []))
        if mismatch:
            self._reply(peer, P.error_header(P.REGISTRATION, f"worker {node.rank} registered different tensors "
                                                             f"than the job: {mismatch}"))
            return
        self._joined_late.discard(node.rank)
        self._activating[node.rank] = (peer, set(range(self.config.num_servers)))
        for rank in range(self.config.num_servers):
            self._reply(self.nodes[("server", rank)].identity,
                        {"op": P.ACTIVATE, "worker": node.rank, "epoch": self._epoch})

    def _on_activated(self, peer: bytes, header: dict) -> None:
        server = self._node_by_identity(peer)
        worker = int(header["worker"])
        pending = self._activating.get(worker)
        if pending is None:
            return
        pending[1].discard(server.rank)
        if not pending[1]:
            del self._activating[worker]
            self._reply(pending[0], {"op": P.REGISTERED, "shard_map": self._shard_map_wire, "joined": True,
                                     "barrier_seq": self._barrier_seq_done})
            log.info("worker %d takes part again from the servers' next step", worker)

    def _restore_server(self, node: _Node) -> None:
        """A restarted server has its blocks: load them from the newest checkpoint."""
        root = self._checkpoint_dir()
        found = checkpoint.find_latest(Path(root)) if root else None
        if found is None:
            node.state, node.fatal = "dead", True
            node.reason = f"restarted, but there is no complete checkpoint under {root} to restore its shards from"
            self._job_failed(node)
            return
        directory, manifest = found
        name = f"server-{node.rank}.pt"
        self._restoring[node.rank] = str(directory)
        self._reply(node.identity, {"op": P.LOAD, "path": str(directory / name),
                                    "sha256": manifest["files"][name]["sha256"]})

    def _restored(self, node: _Node) -> None:
        directory = Path(self._restoring.pop(node.rank))
        step = int(checkpoint.read_manifest(directory)["step"])
        newest = max((int(n.stats.get("steps", 0)) for n in self.nodes.values() if n.role == "worker"), default=0)
        node.state = "live"
        node.last_seen = time.monotonic()
        self._published_servers[node.rank] = node.address
        self._epoch += 1
        log.warning("server %d is back: restored from %s; its shards rolled back %d steps (from about step %d "
                    "to step %d)", node.rank, directory.name, max(0, newest - step), newest, step)

    # -- checkpoints ---------------------------------------------------------------------

    def _on_collective(self, peer: bytes, header: dict) -> None:
        """A worker's part of a checkpoint or restore; it starts once every live worker's part is
        in (``_recheck_collectives``, which also runs when a worker leaves or dies)."""
        node = self._node_for(header, peer)
        op = header["op"]
        if self._shard_map_wire is None:
            raise _Reject(P.CHECKPOINT_ERROR, f"worker {node.rank}: {op} needs registered tensors; call register() first")
        if self._storage is not None:
            raise _Reject(P.CHECKPOINT_ERROR, f"worker {node.rank}: a checkpoint operation is already running")
        self._collecting[op][node.rank] = (peer, header)
        self._recheck_collectives()

    def _start_checkpoint(self, waiting: dict[int, tuple[bytes, dict]]) -> None:
        self._last_checkpoint_dir = str(waiting[min(waiting)][1]["directory"])
        step = max(int(h.get("step", 0)) for _, h in waiting.values())
        directory = Path(str(waiting[min(waiting)][1]["directory"])) / checkpoint.tag_for(step)
        self._storage = _StorageOp(P.CHECKPOINT, waiting, directory, step)
        for rank in range(self.config.num_servers):
            self._reply(self.nodes[("server", rank)].identity,
                        {"op": P.SAVE, "path": str(directory / f"server-{rank}.pt")})
            self._storage.pending.add(rank)

    def _start_restore(self, waiting: dict[int, tuple[bytes, dict]]) -> None:
        root = Path(str(waiting[min(waiting)][1]["directory"]))
        try:
            found = checkpoint.find_latest(root)
            if found is not None:
                checkpoint.check_compatible(found[1], self._shard_map_wire, self.config.mode,
                                            self.config.num_servers, found[0])
        except PSError as exc:
            self._answer_all(waiting, P.error_header(P.CHECKPOINT_ERROR, str(exc)))
            return
        if found is None:
            log.info("no complete checkpoint under %s: starting afresh", root)
            self._answer_all(waiting, {"op": P.RESTORE_DONE, "step": None})
            return
        directory, manifest = found
        self._storage = _StorageOp(P.RESTORE, waiting, directory, int(manifest["step"]))
        for rank in range(self.config.num_servers):
            name = f"server-{rank}.pt"
            self._reply(self.nodes[("server", rank)].identity,
                        {"op": P.LOAD, "path": str(directory / name), "sha256": manifest["files"][name]["sha256"]})
            self._storage.pending.add(rank)

    def _on_server_done(self, peer: bytes, header: dict) -> None:
        node = self._node_by_identity(peer)
        if header["op"] == P.LOADED and node.rank in self._restoring and node.role == "server":
            self._restored(node)
            return
        op = self._storage
        if op is None or node.role != "server":
            raise _Reject(P.PROTOCOL, f"unexpected {header['op']} from {node.role} {node.rank}")
        op.pending.discard(node.rank)
        if header["op"] == P.SAVED:
            op.files[Path(str(header["path"])).name] = {"sha256": header["sha256"], "bytes": header["bytes"]}
        if op.pending:
            return
        self._storage = None
        if op.kind == P.RESTORE:
            log.info("restored checkpoint %s (step %d)", op.directory, op.step)
            self._answer_all(op.waiting, {"op": P.RESTORE_DONE, "step": op.step, "path": str(op.directory)})
            return
        checkpoint.write_manifest(op.directory, {
            "step": op.step, "mode": self.config.mode, "staleness": self.config.staleness,
            "num_servers": self.config.num_servers, "num_workers": self.config.num_workers,
            "shard_map": self._shard_map_wire, "optimizer": self._optimizer_wire, "files": op.files,
            "worker_steps": {str(r): int(h.get("step", 0)) for r, (_, h) in op.waiting.items()},
            "created": time.time(),
        })
        log.info("checkpoint %s written (%d files)", op.directory, len(op.files))
        self._answer_all(op.waiting, {"op": P.CHECKPOINT_DONE, "step": op.step, "path": str(op.directory)})

    def _on_server_error(self, peer: bytes, header: dict) -> None:
        node = self._node_by_identity(peer)
        op = self._storage
        if op is None:
            raise _Reject(P.PROTOCOL, f"unexpected error report from {node.role} {node.rank}")
        self._storage = None
        message = f"server {node.rank} on {node.host}: {header.get('message')}"
        log.error("%s failed: %s", op.kind, message)
        self._answer_all(op.waiting, P.error_header(P.CHECKPOINT_ERROR, message))

    def _answer_all(self, waiting: dict[int, tuple[bytes, dict]], header: dict) -> None:
        for peer, _ in waiting.values():
            self._reply(peer, header)


class _StartFailed(Exception):
    pass


@dataclass
class _StorageOp:
    """A checkpoint or restore in progress: the waiting workers and the servers not done yet."""

    kind: str
    waiting: dict[int, tuple[bytes, dict]]
    directory: Path
    step: int
    pending: set[int] = field(default_factory=set)
    files: dict[str, dict] = field(default_factory=dict)


def _first_mismatch(reference: list[dict], other: list[dict]) -> str:
    ref = {t["name"]: t for t in reference}
    oth = {t["name"]: t for t in other}
    for name in ref:
        if name not in oth:
            return f"{name!r} is missing (worker 0 has it)"
    for name in oth:
        if name not in ref:
            return f"{name!r} is not registered by worker 0"
    for name, t in ref.items():
        o = oth[name]
        if list(o["shape"]) != list(t["shape"]):
            return f"{name!r} has shape {tuple(o['shape'])}, worker 0 has {tuple(t['shape'])}"
        if o["dtype"] != t["dtype"]:
            return f"{name!r} has dtype {o['dtype']}, worker 0 has {t['dtype']}"
    if [t["name"] for t in reference] != [t["name"] for t in other]:
        return "the same tensors were registered in a different order"
    return ""


def tell_launcher(line: str) -> None:
    """A machine-readable stdout line for ps-launch; unlike log lines it does not depend on PS_LOG_LEVEL."""
    print(line, flush=True)


def announce(address: str, address_file: Optional[str]) -> None:
    """Tell whoever started us where we listen: a stdout line, and a file written atomically."""
    tell_launcher(f"PS_SCHEDULER_ADDRESS={address}")
    if address_file:
        tmp = f"{address_file}.tmp{os.getpid()}"
        with open(tmp, "w") as fh:
            fh.write(address + "\n")
        os.replace(tmp, address_file)


def main(config: SchedulerConfig, address_file: Optional[str] = None) -> int:
    scheduler = Scheduler(config)
    announce(scheduler.address, address_file)
    code = scheduler.run()
    sys.stdout.flush()
    return code
