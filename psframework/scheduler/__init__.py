"""The scheduler role: membership, ranks, the shard map, barriers, heartbeats and the job's mode.

Every server and worker says hello; once all expected nodes are there the scheduler welcomes
them with their ranks, the servers' addresses and the mode. It then checks that all workers
register the same tensors, computes the shard map, hands the servers their blocks, runs
barriers and checkpoints, and declares dead any node whose heartbeats stop. It exits when every
worker has closed (exit 0) or the job cannot go on (exit 1).

The parts: ``roster`` (who is in the job), ``registration`` (tensors, shard map, late workers) and
``collectives`` (barriers, checkpoints, restores); this module owns the socket and the loop, and
decides what a death means for the job.

Run one with ``python -m psframework scheduler`` (ps-launch does this for you). Besides its log
(stderr) it prints lines for the launcher on stdout: ``PS_SCHEDULER_ADDRESS=tcp://H:P`` once
listening, ``PS_JOINED role=R rank=N host=H`` per node that said hello, ``PS_CLUSTER_UP`` once all
joined, and ``PS_DEAD role=R rank=N host=H pid=P reason=TEXT`` per node it declares dead (so the
launcher ends a process that is stopped or hung rather than gone).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Optional

from .. import protocol as P
from ..config import SchedulerConfig
from ..errors import ProtocolError
from ..logs import RateLimitedLog
from ..metrics import MetricsServer, NodeSample, Recorder, process_stats
from ..node import POLL_SLICE
from ..trace import Tracer, parse_steps
from ..security import load_secret
from ..transport import Transport, ZmqTransport
from .collectives import Collectives
from .readers import Readers
from .registration import Registration
from .rollback import Rollback
from .roster import DEAD, LEFT, LIVE, RESTORING, ROLES, Node, Roster, ServerClaims

log = logging.getLogger("psframework.scheduler")


class Scheduler:
    def __init__(self, config: SchedulerConfig, transport: Optional[Transport] = None):
        self.config = config
        self.recorder = Recorder()  # the scheduler's own metrics: checkpoints, restarts
        self.tracer = Tracer(config.trace_dir, parse_steps(config.trace_steps))
        self.tracer.start("scheduler", 0)
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self.socket = self.transport.listen(config.bind_host, config.port, max_message_bytes=config.max_message_bytes)
        self.address = self.socket.address
        self.roster = Roster(config)
        self.claims = ServerClaims(config)
        self.registration = Registration(self.roster, self._send, lambda: self.collectives.barrier_seq_done)
        self.collectives = Collectives(self.roster, self._send, lambda: self.registration.shard_map,
                                       lambda: self.registration.optimizer,
                                       lambda: (self.rollback.epoch, self.rollback.step), self.recorder)
        self.rollback = Rollback(self.roster, self._send, self.collectives.checkpoint_dir)
        self.readers = Readers(self.roster, self.registration, self._send)
        self._started_at = time.monotonic()
        self._shutdown_at: Optional[float] = None
        self._failed = False
        self._garbage_log = RateLimitedLog(log)
        self.metrics: Optional[MetricsServer] = None
        self._published_at = 0.0
        if config.metrics_port is not None:
            try:
                self.metrics = MetricsServer(config.bind_host, config.metrics_port)
            except BaseException:
                self.close()
                raise

    @property
    def metrics_address(self) -> Optional[str]:
        """Where Prometheus scrapes this job, once a metrics port was given."""
        if self.metrics is None:
            return None
        host = self.address.rsplit(":", 1)[0].split("//", 1)[1]
        return f"http://{host}:{self.metrics.port}/metrics"

    # -- lifecycle -----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the job is over; returns the exit code."""
        try:
            while True:
                if self.transport.poll([self.socket], POLL_SLICE):
                    self._drain()
                self.readers.welcome_waiting()
                now = time.monotonic()
                self._publish_metrics(now)
                if not self.roster.running:
                    if self._start_deadline_passed(now):
                        return 1
                else:
                    self._check_heartbeats(now)
                if self._shutdown_at is not None and now >= self._shutdown_at:
                    tell_launcher(self._summary())
                    return 1 if self._failed else 0
        finally:
            self.close()

    def close(self) -> None:
        self.tracer.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def _publish_metrics(self, now: float) -> None:
        """A snapshot of the roster for the metrics endpoint, a few times per heartbeat interval."""
        if self.metrics is None or now - self._published_at < self.config.timing.heartbeat_interval / 4:
            return
        self._published_at = now
        own = NodeSample("scheduler", 0, self.config.host, True, 0.0, {**self.recorder.stats(), **process_stats()})
        self.metrics.publish([own] + [NodeSample(n.role, n.rank, n.host, n.state == LIVE, now - n.last_seen,
                                                 dict(n.stats)) for n in self.roster.nodes.values()])

    def _drain(self) -> None:
        for _ in range(256):
            if not self.transport.poll([self.socket], 0):
                return
            peer, head = self.socket.recv_header()
            self.socket.skip_rest()
            try:
                message = P.decode(head)
            except ProtocolError as exc:
                self._garbage_log.warning("dropped a malformed message from %r: %s", peer, exc)
                self._send(peer, P.Error(kind=P.PROTOCOL, message=str(exc), req=P.request_id(head)))
                continue
            try:
                self._handle(peer, message)
            except P.Rejected as exc:
                self._garbage_log.warning("rejected %s from %r: %s", type(message).__name__, peer, exc)
                self._send(peer, exc.reply())

    def _send(self, peer: bytes, message: P.Message) -> None:
        self.socket.send([P.encode(message)], peer=peer)

    def _handle(self, peer: bytes, message: P.Message) -> None:
        kind = type(message)
        if kind is P.Hello:
            self._on_hello(peer, message)
        elif kind is P.Heartbeat:
            self._send(peer, self.roster.heartbeat(message, shutdown=self._shutdown_at is not None,
                                                   rollback=(self.rollback.epoch, self.rollback.step)))
        elif kind is P.Register:
            self.registration.on_register(peer, message)
        elif kind is P.Barrier:
            self.collectives.on_barrier(peer, message)
        elif kind in (P.Checkpoint, P.Restore):
            self.collectives.on_worker_part(peer, message)
        elif kind is P.Bye:
            self._on_bye(peer, message)
        elif kind in (P.SetupDone, P.Saved, P.Loaded, P.Activated, P.Error):
            self._from_server(self.roster.by_identity(peer), message)
        else:
            raise P.Rejected(P.PROTOCOL, f"the scheduler does not handle {kind.__name__} messages")

    def _from_server(self, server: Node, message: P.Message) -> None:
        if server.role != "server":
            raise P.Rejected(P.PROTOCOL, f"{type(message).__name__} from {server.role} {server.rank}")
        if isinstance(message, P.SetupDone):
            self._on_setup_done(server)
        elif isinstance(message, P.Activated):
            self.registration.on_activated(server, message)
        elif isinstance(message, P.Error):
            self.collectives.on_server_error(server, message)
        elif not (isinstance(message, P.Loaded) and self.rollback.on_loaded(server)):
            self.collectives.on_saved_or_loaded(server, message)

    # -- joining -------------------------------------------------------------------------

    def _on_hello(self, peer: bytes, hello: P.Hello) -> None:
        try:
            P.check_version(hello.version, f"the {hello.role} on {hello.host}", f"the scheduler on {self.config.host}")
        except ProtocolError as exc:
            raise P.Rejected(P.PROTOCOL, str(exc)) from None
        if hello.role == "reader":
            self.readers.on_hello(peer, hello)
            return
        if hello.role not in ROLES:
            raise P.Rejected(P.PROTOCOL, f"hello from unknown role {hello.role!r}")
        if hello.role == "server" and not hello.address:
            raise P.Rejected(P.PROTOCOL, "a server's hello must carry its data address")
        if self.roster.running:
            self._on_rejoin(peer, hello)
            return
        complete = self.roster.admit(peer, hello)
        tell_launcher(f"PS_JOINED role={hello.role} rank={'-' if hello.rank is None else hello.rank} host={hello.host}")
        if complete:
            for node in self.roster.assign_ranks():
                node.last_seen = time.monotonic()
                self._send(node.identity, self.roster.welcome(node))
            log.info("all %d servers and %d workers joined; mode %s", self.config.num_servers,
                     self.config.num_workers, self.config.mode)
            tell_launcher("PS_CLUSTER_UP")
            self.tracer.instant("cluster up", "membership")

    def _start_deadline_passed(self, now: float) -> bool:
        if now - self._started_at <= self.config.timing.start_timeout:
            return False
        servers, want_s, workers, want_w = self.roster.counts()
        joined = ", ".join(f"{h.role} from {h.host}" for _, h in self.roster.hellos) or "nobody"
        message = (f"the cluster did not come up within {self.config.timing.start_timeout} s: "
                   f"{servers} of {want_s} servers and {workers} of {want_w} workers registered "
                   f"(joined: {joined}); check the missing processes' output")
        log.error(message)
        for peer, _ in self.roster.hellos:
            self._send(peer, P.Error(kind=P.TIMEOUT, message=message))
        return True

    def _on_rejoin(self, peer: bytes, hello: P.Hello) -> None:
        role = hello.role
        allowed = self.config.elastic if role == "worker" else self.config.restart_servers
        if not allowed:
            flag = "elastic" if role == "worker" else "restart-failed-servers"
            raise P.Rejected(P.CONFIG, f"the job is already running; {role} on {hello.host} arrived too late "
                                       f"(start the job with --{flag} to let nodes join later)")
        replaced = self.roster.replaced(hello)
        if replaced is not None:
            if self.claims.still_heartbeats(replaced, time.monotonic()):
                self.claims.hold(peer, hello, time.monotonic())  # decided in _check_heartbeats
                return
            self._declare_dead(replaced, f"replaced by a new server process (pid {hello.pid})")
        restoring = role == "server" and self.registration.done
        if restoring:
            self.recorder.add("psframework_restarts")
        node = self.roster.rejoin(peer, hello, restoring)
        if role == "worker":
            self.registration.joined_late(node.rank)
        self._send(peer, self.roster.welcome(node))
        if restoring:
            self._send(peer, self.registration.setup_message())
            self.registration.server_back(node)

    def _on_setup_done(self, server: Node) -> None:
        if server.state != RESTORING:
            self.registration.on_setup_done(server)
            return
        reason = self.rollback.start(server)
        if reason is not None:
            server.state, server.fatal, server.reason = DEAD, True, reason
            self._job_failed(server)
        else:
            self.collectives.rolled_back()

    # -- liveness and leaving ------------------------------------------------------------

    def _check_heartbeats(self, now: float) -> None:
        for node in self.roster.silent(now):
            self._declare_dead(node, f"no heartbeat for {now - node.last_seen:.1f} s")
        admit, refuse = self.claims.decide(self.roster, now)
        for peer, hello in admit:
            self._on_rejoin(peer, hello)
        for peer, hello, server in refuse:
            message = (f"{server} still heartbeats; a second process for its rank is refused "
                       f"({hello.role} {hello.rank} from {hello.host}, pid {hello.pid})")
            log.warning("refused a hello from %s: %s", hello.host, message)
            self._send(peer, P.Error(kind=P.CONFIG, message=message))
        self.registration.expire(now)
        for node in list(self.roster.nodes.values()):
            if node.state == DEAD and not node.fatal and node.role == "server" and now > node.deadline:
                node.fatal = True
                node.reason += f"; it was not restarted within {self.config.timing.start_timeout} s"
                self._job_failed(node)

    def _declare_dead(self, node: Node, reason: str) -> None:
        self.roster.mark(node, DEAD, reason)
        if node.role == "server":
            self.collectives.server_lost(node)
        tell_launcher(f"PS_DEAD role={node.role} rank={node.rank} host={node.host} pid={node.pid} "
                      f"reason={' '.join(reason.split())}")
        if node.role == "worker" and self.config.elastic:
            node.fatal = False
            log.warning("%s is gone (%s); elastic: the others go on without it", node, reason)
            self._workers_changed()
        elif node.role == "server" and self.config.restart_servers and self.collectives.checkpoint_dir():
            node.fatal = False
            node.deadline = time.monotonic() + self.config.timing.start_timeout
            log.warning("%s is dead (%s); waiting for its restart", node, reason)
        else:
            if node.role == "server" and self.config.restart_servers:
                node.reason += "; it cannot be restarted: no checkpoint directory (set --checkpoint-dir)"
            self._job_failed(node)
        self._maybe_finish()

    def _job_failed(self, node: Node) -> None:
        self._failed = True
        log.error("%s is dead: %s", node, node.reason)
        message = f"{node} died ({node.reason})"
        self.collectives.fail(message)
        self.registration.fail(P.PEER_LOST, f"register cannot complete: {message}")
        self.readers.fail(f"the job failed before its tensors were registered: {message}")

    def _on_bye(self, peer: bytes, bye: P.Bye) -> None:
        node = self.roster.node("worker", bye.rank, peer)
        if bye.steps >= 0:
            node.stats = {**node.stats, "psframework_worker_steps": bye.steps}
        if node.state == LIVE:
            self.roster.mark(node, LEFT)
            log.info("worker %d on %s finished", node.rank, node.host)
        self._send(peer, P.ByeAck())
        self._workers_changed()
        self._maybe_finish()

    def _workers_changed(self) -> None:
        """A worker left or died: waits that no longer need it may complete."""
        self.collectives.recheck()
        self.registration.recheck()

    def _summary(self) -> str:
        """The job's totals for ps-launch's last line: the workers' steps, the bytes the servers moved."""
        nodes = self.roster.nodes.values()
        steps = max((int(n.stats.get("psframework_worker_steps", 0)) for n in nodes if n.role == "worker"), default=0)
        moved = sum(int(n.stats.get(k, 0)) for n in nodes if n.role == "server"
                    for k in ("psframework_server_push_bytes", "psframework_server_pull_bytes"))
        return f"PS_SUMMARY steps={steps} bytes={moved}"

    def _maybe_finish(self) -> None:
        if self._shutdown_at is None and all(n.state != LIVE for n in self.roster.workers()):
            # linger for a few heartbeats so every server hears that the job is over
            self._shutdown_at = time.monotonic() + 3 * self.config.timing.heartbeat_interval
            self.readers.fail("the job is over: every worker finished; there is nothing to read any more")
            log.info("all workers are done; shutting the job down")


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
    if scheduler.metrics_address:
        tell_launcher(f"PS_METRICS_ADDRESS={scheduler.metrics_address}")
    code = scheduler.run()
    sys.stdout.flush()
    return code


__all__ = ["Scheduler", "announce", "main", "tell_launcher"]
