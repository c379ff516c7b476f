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
from typing import Optional

from . import protocol as P
from .config import SchedulerConfig
from .errors import ProtocolError, PSError
from .node import POLL_SLICE, RateLimitedLog, describe
from .sharding import TensorSpec, assign_shards
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
    state: str = "live"  # live | dead | left
    reason: str = ""

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
        self.transport = transport or ZmqTransport()
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
        self._barriers: dict[int, dict[int, bytes]] = {}
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
            raise _Reject(P.CONFIG if hasattr(P, "CONFIG") else "config",
                          f"the job is already running; {role} on {header.get('host')} arrived too late")
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
        servers = [self.nodes[("server", r)].address for r in range(self.config.num_servers)]
        common = {
            "op": P.WELCOME, "num_workers": self.config.num_workers, "num_servers": self.config.num_servers,
            "mode": self.config.mode, "staleness": self.config.staleness, "servers": servers,
            "heartbeat_interval": self.config.timing.heartbeat_interval,
            "heartbeat_timeout": self.config.timing.heartbeat_timeout,
            "server_device": self.config.server_device, "chunk_bytes": self.config.chunk_bytes,
        }
        for node in self.nodes.values():
            node.last_seen = time.monotonic()
            self._reply(node.identity, {**common, "rank": node.rank})
        self._running = True
        log.info("all %d servers and %d workers joined; mode %s", self.config.num_servers,
                 self.config.num_workers, self.config.mode)
        tell_launcher("PS_CLUSTER_UP")

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

    def _node_for(self, header: dict) -> _Node:
        node = self.nodes.get((header.get("role"), header.get("rank")))
        if node is None:
            raise _Reject(P.PROTOCOL, f"message from unknown node {header.get('role')} {header.get('rank')}")
        return node

    def _on_heartbeat(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header)
        if node.state == "live":
            node.last_seen = time.monotonic()
        self._reply(peer, {
            "op": P.HEARTBEAT_ACK,
            "dead": [n.info() for n in self.nodes.values() if n.state == "dead"],
            "left": sorted(n.rank for n in self.nodes.values() if n.role == "worker" and n.state == "left"),
            "shutdown": self._shutdown_at is not None,
        })

    def _check_heartbeats(self, now: float) -> None:
        timeout = self.config.timing.heartbeat_timeout
        for node in self.nodes.values():
            if node.state == "live" and now - node.last_seen > timeout:
                node.state, node.reason = "dead", f"no heartbeat for {now - node.last_seen:.1f} s"
                self._failed = True
                log.error("%s is dead: %s", describe(node.info()), node.reason)
                self._fail_waits(node)
                self._maybe_finish()

    def _fail_waits(self, dead: _Node) -> None:
        message = f"{describe(dead.info())} died ({dead.reason})"
        for seq, waiting in list(self._barriers.items()):
            for peer in waiting.values():
                self._reply(peer, P.error_header(P.PEER_LOST, f"barrier {seq} cannot complete: {message}"))
            del self._barriers[seq]
        for peer, _ in self._registrations.values():
            self._reply(peer, P.error_header(P.PEER_LOST, f"register cannot complete: {message}"))
        self._registrations.clear()

    def _maybe_finish(self) -> None:
        workers = [n for n in self.nodes.values() if n.role == "worker"]
        if self._shutdown_at is None and all(n.state != "live" for n in workers):
            # linger for a few heartbeats so every server hears that the job is over
            self._shutdown_at = time.monotonic() + 3 * self.config.timing.heartbeat_interval
            log.info("all workers are done; shutting the job down")

    # -- registration --------------------------------------------------------------------

    def _on_register(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header)
        if self._shard_map_wire is not None:
            raise _Reject(P.REGISTRATION, f"worker {node.rank}: tensors are already registered; "
                                          "register() may be called once per job")
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
        optimizer = self._registrations[0][1]["optimizer"]
        for rank in range(self.config.num_servers):
            node = self.nodes[("server", rank)]
            self._reply(node.identity, {"op": P.SETUP, "shard_map": self._shard_map_wire, "optimizer": optimizer})
            self._setup_waiting.add(rank)
        log.info("registered %d tensors in %d blocks; server bytes %s", len(specs), len(shard_map.blocks),
                 shard_map.server_bytes())

    def _live_workers(self) -> int:
        return sum(1 for n in self.nodes.values() if n.role == "worker" and n.state == "live")

    def _check_registrations(self) -> None:
        from .errors import RegistrationError

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
        node = self._node_for(header)
        seq = int(header["seq"])
        waiting = self._barriers.setdefault(seq, {})
        waiting[node.rank] = peer
        if len(waiting) >= self._live_workers():
            for p in waiting.values():
                self._reply(p, {"op": P.BARRIER_DONE, "seq": seq})
            del self._barriers[seq]

    def _on_bye(self, peer: bytes, header: dict) -> None:
        node = self._node_for(header)
        if node.state == "live":
            node.state = "left"
            log.info("worker %d on %s finished", node.rank, node.host)
        self._reply(peer, {"op": P.BYE_ACK})
        # a worker that leaves must not hold back barriers of the others
        for seq, waiting in list(self._barriers.items()):
            if waiting and len(waiting) >= self._live_workers():
                for p in waiting.values():
                    self._reply(p, {"op": P.BARRIER_DONE, "seq": seq})
                del self._barriers[seq]
        self._maybe_finish()


class _StartFailed(Exception):
    pass


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
