"""Membership shared by servers and workers: joining the job, heartbeats, liveness.

``join_cluster`` says hello to the scheduler and waits (with a deadline) for its welcome. The
returned ``Membership`` owns a heartbeat thread with its own socket; the scheduler's answers to
heartbeats carry the nodes that died or left, and ``check()`` turns those into a ``PeerLostError``
that names the node, so no wait in the system can hang on a dead peer.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Callable, Optional

from . import protocol as P
from .config import NodeConfig
from .errors import ClosedError, PeerLostError, ProtocolError, PSTimeoutError, error_for
from .metrics import process_stats
from .transport import Socket, Transport

log = logging.getLogger("psframework.node")

POLL_SLICE = 0.1  # longest a blocking wait goes without checking liveness
STOPPED = 5 * POLL_SLICE  # the heartbeat thread did not run for this long: this process was stopped (or starved)


def describe(node: P.NodeInfo) -> str:
    return f"{node.role} {node.rank} on host {node.host} (pid {node.pid})"


class _Heartbeat(threading.Thread):
    """Sends heartbeats on a socket of its own and records what the scheduler answers."""

    def __init__(self, membership: "Membership"):
        super().__init__(name=f"ps-heartbeat-{membership.role}-{membership.rank}", daemon=True)
        self._m = membership
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        m = self._m
        sock = m.transport.connect(m.scheduler)
        try:
            while not self._stop_event.is_set():
                stats = {**m.stats, **m.stats_source(), **process_stats()}
                sock.send([P.encode(P.Heartbeat(role=m.role, rank=m.rank, token=m.welcome.token, stats=stats))])
                deadline = time.monotonic() + m.interval
                while (left := deadline - time.monotonic()) > 0 and not self._stop_event.is_set():
                    ready = m.transport.poll([sock], min(left, POLL_SLICE))
                    m.tick()  # before the answers: time stopped before an answer is no silence after it
                    if ready:
                        self._receive(sock)
        except Exception as exc:  # a dying heartbeat must surface as a liveness failure, not vanish
            m.record_failure(f"heartbeat thread failed: {exc!r}")
        finally:
            sock.close()

    def _receive(self, sock: Socket) -> None:
        _, head = sock.recv_header()
        sock.skip_rest()
        try:
            message = P.decode(head)
        except ProtocolError:
            return
        if isinstance(message, P.HeartbeatAck):
            self._m.record_ack(message)


class Membership:
    """This node's place in the job, and the liveness of every other node."""

    def __init__(self, transport: Transport, socket: Socket, config: NodeConfig, role: str, welcome: P.Welcome):
        self.transport = transport
        self.socket = socket
        self.scheduler = config.scheduler
        self.host = config.host
        self.role = role
        self.welcome = welcome
        self.rank = welcome.rank
        self.num_workers = welcome.num_workers
        self.num_servers = welcome.num_servers
        self.mode = welcome.mode
        self.staleness = welcome.staleness
        self.servers: list[str] = list(welcome.servers)
        self.interval = welcome.heartbeat_interval
        self.timeout = welcome.heartbeat_timeout
        self.elastic = welcome.elastic
        self.stats: dict = {}
        self.stats_source: Callable[[], dict] = dict  # more stats, read on the heartbeat thread (metrics.py)
        self._lock = threading.Lock()
        self._last_ack = self._last_tick = time.monotonic()
        self._stopped = 0.0  # seconds since the last ack that this process did not run (SIGSTOP)
        self._dead: list[P.NodeInfo] = []
        self._left: set[int] = set()
        self._departed: set[int] = set()
        self._epoch = 0
        self._server_addresses: list[str] = list(self.servers)
        self._shutdown = False
        self._rollback = (0, 0)  # the job's rollback epoch and its step (scheduler/rollback.py)
        self._failure: Optional[str] = None
        self._changed = False
        self._closed = False
        self._interrupted = False
        self._heartbeat = _Heartbeat(self)
        self._heartbeat.start()

    # -- what the heartbeat thread records --------------------------------------------------

    def tick(self) -> None:
        """The heartbeat thread runs (every poll slice): a long gap since it last ran is time this
        process was stopped, which is no silence of the scheduler's."""
        with self._lock:
            now = time.monotonic()
            if now - self._last_tick > STOPPED:
                self._stopped += now - self._last_tick
            self._last_tick = now

    def record_ack(self, ack: P.HeartbeatAck) -> None:
        with self._lock:
            self._last_ack = self._last_tick = time.monotonic()
            self._stopped = 0.0
            self._shutdown = ack.shutdown
            if ack.epoch < self._epoch:
                return  # sent before a membership change we already know of
            self._epoch = ack.epoch
            left, departed = set(ack.left), set(ack.departed)
            if len(ack.dead) != len(self._dead) or left != self._left or departed != self._departed:
                self._changed = True
            self._dead, self._left, self._departed = list(ack.dead), left, departed
            self._server_addresses = list(ack.servers)
            self._rollback = max(self._rollback, (ack.rollback, ack.rollback_step))

    def record_failure(self, reason: str) -> None:
        with self._lock:
            self._failure = reason

    # -- what the owner thread reads ---------------------------------------------------------

    @property
    def peers_changed(self) -> bool:
        with self._lock:
            changed, self._changed = self._changed, False
            return changed

    @property
    def shutdown_requested(self) -> bool:
        with self._lock:
            return self._shutdown

    @property
    def dead_workers(self) -> set[int]:
        with self._lock:
            return {d.rank for d in self._dead if d.role == "worker"}

    def declared_dead(self, worker: int) -> bool:
        """Whether the scheduler declared this worker dead (and no new process took its rank since)."""
        with self._lock:
            return worker in self._departed or any(d.role == "worker" and d.rank == worker for d in self._dead)

    @property
    def departed_workers(self) -> set[int]:
        """Workers an elastic job goes on without (they died; another may take their place)."""
        with self._lock:
            return set(self._departed)

    def rejoined(self, worker: int, epoch: int) -> None:
        """The scheduler said this worker is back (as of ``epoch``): older news of its death no longer counts."""
        with self._lock:
            if epoch >= self._epoch:
                self._epoch = epoch
                self._departed.discard(worker)
                self._left.discard(worker)

    @property
    def rollback(self) -> tuple[int, int]:
        """How many times the job went back to a checkpoint, and the step it last went back to."""
        with self._lock:
            return self._rollback

    def note_rollback(self, epoch: int, step: int) -> None:
        """A server said the job went back (before the scheduler's heartbeat answer did)."""
        with self._lock:
            self._rollback = max(self._rollback, (epoch, step))

    def moved_servers(self) -> dict[int, str]:
        """Servers whose address changed since the last call (a restarted server), by rank."""
        with self._lock:
            current = list(self._server_addresses)
        moved = {r: a for r, a in enumerate(current) if r < len(self.servers) and a != self.servers[r]}
        self.servers = current
        return moved

    @property
    def left_workers(self) -> set[int]:
        with self._lock:
            return set(self._left)

    def gone_workers(self) -> dict[int, str]:
        with self._lock:
            gone = {r: f"worker {r} closed" for r in self._left}
            gone.update({d.rank: f"{describe(d)} died ({d.reason or 'no heartbeat'})"
                         for d in self._dead if d.role == "worker"})
            return gone

    def check(self, peers: bool = True) -> None:
        """Raise PeerLostError if the scheduler (or, with ``peers``, any node of the job) is gone."""
        if self._closed:
            raise ClosedError(f"{self.role} {self.rank} is closed")
        if self._interrupted:
            raise ClosedError(f"{self.role} {self.rank} is closing: its waits are interrupted")
        with self._lock:
            silent = self._silence(time.monotonic())
            dead = list(self._dead)
            failure = self._failure
        if failure:
            raise PeerLostError(f"{self.role} {self.rank} lost the scheduler at {self.scheduler}: {failure}",
                                role="scheduler", rank=0)
        if dead and peers:
            d = dead[0]
            raise PeerLostError(
                f"{describe(d)} is dead ({d.reason or 'no heartbeat'}); the job cannot continue. "
                "Check that process's output for the root cause.",
                role=d.role, rank=d.rank, host=d.host,
            )
        if silent > self.timeout:
            raise PeerLostError(
                f"the scheduler at {self.scheduler} has not answered heartbeats for {silent:.1f} s "
                f"(timeout {self.timeout} s); it has probably died", role="scheduler", rank=0)

    def _silence(self, now: float) -> float:
        """How long the scheduler has not answered while this process ran. Time it was stopped
        (SIGSTOP) does not count: that the heartbeat thread has not run since is seen here too, before
        it runs again, so the first wait after a long stop does not blame the scheduler."""
        unseen = now - self._last_tick
        return now - self._last_ack - self._stopped - (unseen if unseen > STOPPED else 0.0)

    def interrupt(self) -> None:
        """Make every wait that checks liveness (in any thread) end with ``ClosedError``, until ``resume()``."""
        self._interrupted = True

    def resume(self) -> None:
        self._interrupted = False

    # -- control requests from the owner thread ----------------------------------------------

    def send(self, message: P.Message) -> None:
        self.socket.send([P.encode(message)], check=self.check)

    def request(self, message: P.Message, expect: type, timeout: Optional[float] = None):
        """Send a control request to the scheduler and wait for its answer (a message of type
        ``expect``), checking liveness; an ``Error`` answer is raised as its exception."""
        self.send(message)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.check()
            if deadline is not None and time.monotonic() > deadline:
                raise PSTimeoutError(f"{type(message).__name__} got no answer from the scheduler within {timeout} s")
            if not self.transport.poll([self.socket], POLL_SLICE):
                continue
            for reply in self.receive():
                if isinstance(reply, P.Error):
                    if reply.kind == P.ROLLED_BACK:
                        self.note_rollback(reply.rollback, reply.step)
                    raise error_for(reply.kind, reply.message, reply.step)
                if isinstance(reply, expect):
                    return reply
                log.debug("ignoring %s while waiting for %s", type(reply).__name__, expect.__name__)

    def receive(self) -> list[P.Message]:
        messages = []
        while self.transport.poll([self.socket], 0):
            _, head = self.socket.recv_header()
            self.socket.skip_rest()
            try:
                messages.append(P.decode(head))
            except ProtocolError as exc:
                log.warning("dropped malformed message from the scheduler: %s", exc)
        return messages

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._heartbeat.stop()
        self._heartbeat.join(timeout=5)
        self.socket.close()


def join_cluster(transport: Transport, config: NodeConfig, role: str, address: str = "",
                 wait: Optional[Callable[[], None]] = None) -> Membership:
    """Say hello to the scheduler and wait for the welcome (within ``config.start_timeout``)."""
    sock = transport.connect(config.scheduler, max_message_bytes=config.max_message_bytes)
    hello = P.Hello(role=role, rank=config.rank, host=config.host, pid=os.getpid(), address=address,
                    version=P.VERSION)
    try:
        sock.send([P.encode(hello)])
        welcome = await_welcome(transport, sock, P.Welcome, config.start_timeout, f"this {role} on {config.host}", wait)
        if welcome is not None:
            return Membership(transport, sock, config, role, welcome)
        raise PSTimeoutError(
            f"{role} on {config.host} got no welcome from the scheduler at {config.scheduler} within "
            f"{config.start_timeout} s: is the scheduler running, and did every server and worker start?")
    except BaseException:
        sock.close()
        raise


def await_welcome(transport: Transport, sock: Socket, kind: type, timeout: float, me: str,
                  wait: Optional[Callable[[], None]] = None) -> Optional[P.Message]:
    """The scheduler's welcome of ``kind`` on ``sock``, its version checked; an error it answers with
    is raised; None if nothing came within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if wait is not None:
            wait()
        if not transport.poll([sock], POLL_SLICE):
            continue
        _, head = sock.recv_header()
        sock.skip_rest()
        reply = P.decode(head)
        if isinstance(reply, kind):
            P.check_version(reply.version, f"the scheduler on {reply.host}", me)
            return reply
        if isinstance(reply, P.Error):
            raise error_for(reply.kind, reply.message)
    return None


__all__ = ["Membership", "POLL_SLICE", "await_welcome", "describe", "join_cluster"]
