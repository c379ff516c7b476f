"""Requests to the servers and their futures: the worker's client part.

Every request has an id; its answer comes back on the socket of its server and resolves it. A
``Future`` gathers the requests of one push, pull or push_pull. ``Client.wait_until`` receives
answers in slices of ``POLL_SLICE``, checking between slices that every node of the job still
lives, so no wait hangs on a dead peer. A server restarted at a new address gets the requests it
never answered again.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .. import protocol as P
from ..errors import ClosedError, PSError, PSTimeoutError, ProtocolError, RolledBackError, error_for
from ..metrics import Recorder
from ..node import POLL_SLICE, Membership
from ..trace import Tracer
from ..transport import Socket, Transport

log = logging.getLogger("psframework.worker")


class Future:
    """The pending result of push, pull or push_pull. ``wait()`` returns once every server answered.

    >>> worker.push(grads).wait(timeout=30)     # doctest: +SKIP
    """

    def __init__(self, client: "Client"):
        self._client = client
        self._outstanding = 0
        self._sealed = True  # False while more requests may still join (an exchange sending block by block)
        self._abandoned = False  # its answers are no longer wanted: they must not write anywhere
        self._error: Optional[PSError] = None
        self._finalizers: list[Callable[[], None]] = []
        self._on_complete: list[Callable[[], None]] = []
        self._before_done: list[Callable[[], Optional[PSError]]] = []
        self._copy_streams: dict[torch.device, "torch.cuda.Stream"] = {}  # that copied onto GPUs
        # by block: the events of copies out of device lanes queued behind the servers' flags at once
        self.prequeued: dict[int, list] = {}
        # every value's copy was so queued, and the caller's streams ordered after them: the caller
        # may go on before wait(), which then only reports errors
        self.ordered_on_device = False
        # tensors that servers read or write where they lie (the direct exchange): held until every
        # answer is in and the ``before_done`` callbacks waited for the servers' device work
        self.kept: list[torch.Tensor] = []

    def done(self) -> bool:
        return self._outstanding == 0 and self._sealed

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until complete; raises the first error any server reported, or PeerLostError."""
        self._client.wait_until(self.done, timeout)
        finalizers, self._finalizers = self._finalizers, []
        if self._error is not None:
            raise self._error
        for finalize in finalizers if not self._abandoned else ():
            finalize()
        self.order_streams()

    # -- what the worker's parts use -----------------------------------------------------

    def unsealed(self) -> "Future":
        """More requests join until ``seal()``; only then can the future complete."""
        self._sealed = False
        return self

    def seal(self) -> None:
        self._sealed = True
        self._maybe_complete()

    def abandon(self) -> None:
        """Whoever waited for this gave up (its step failed): answers still to come are dropped,
        and neither ``on_complete`` callbacks nor finalizers run (it did not happen)."""
        self._abandoned = True

    @property
    def discards(self) -> bool:
        """Answers still to come must not write into the destinations: the request was abandoned or
        already failed, so its caller has been (or will be) told it did not happen."""
        return self._abandoned or self._error is not None

    def expect(self) -> None:
        self._outstanding += 1

    def resolve(self, error: Optional[PSError] = None) -> None:
        self._outstanding -= 1
        if error is not None and self._error is None:
            self._error = error
        self._maybe_complete()

    def _maybe_complete(self) -> None:
        if self.done() and self._before_done:
            callbacks, self._before_done = self._before_done, []
            for callback in callbacks:
                error = callback()
                if error is not None and self._error is None:
                    self._error = error
        if self.done():
            self.kept = []
        if self.done() and self._error is None and not self._abandoned and self._on_complete:
            callbacks, self._on_complete = self._on_complete, []
            for callback in callbacks:
                callback()

    def on_complete(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once, when every request succeeded (callbacks in the order given)."""
        self._on_complete.append(callback)
        self._maybe_complete()

    def before_done(self, callback: Callable[[], Optional[PSError]]) -> None:
        """Run ``callback`` once every request is answered, failed or not, before the future
        completes; an error it returns is the future's."""
        self._before_done.append(callback)

    def add_finalizer(self, finalize: Callable[[], None]) -> None:
        """Run ``finalize`` in ``wait()`` once every request succeeded."""
        self._finalizers.append(finalize)

    def copies_on(self, device: torch.device, stream: "torch.cuda.Stream") -> None:
        """Copies onto ``device`` are queued on ``stream``: ``wait()`` orders the caller after them."""
        self._copy_streams[device] = stream

    def order_streams(self) -> None:
        """Make the calling thread's current CUDA streams wait for this request's copies to GPUs."""
        for device, stream in self._copy_streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)


@dataclass
class Request:
    """One message to one server, and what to do with its answer."""
    future: Future
    server: int
    frames: list = field(default_factory=list)  # kept to resend if the server is restarted
    reply: Optional[P.Message] = None
    # where each reply frame lands, and what to do once it did (copy it on to a GPU)
    dest: list[tuple[memoryview, Optional[Callable[[], None]]]] = field(default_factory=list)
    keep: list = field(default_factory=list)  # tensors whose memory is on the wire or receives into
    rollback: int = 0  # the job's rollback epoch when it was sent
    # lane requests: (req, reply, ok) -> the error that reading the answer's values met, if any
    on_answer: Optional[Callable[["Request", P.Message, bool], Optional[PSError]]] = None
    sent_us: float = 0.0  # for its trace event


class Client:
    """The worker's sockets to the servers and the requests awaiting answers on them."""

    def __init__(self, transport: Transport, membership: Membership, max_message_bytes: int,
                 recorder: Optional[Recorder] = None, tracer: Optional[Tracer] = None):
        self.transport = transport
        self.recorder, self.tracer = recorder or Recorder(), tracer or Tracer(None)
        self.membership = membership
        self._max_message_bytes = max_message_bytes
        self.servers: list[Socket] = [transport.connect(a, max_message_bytes=max_message_bytes)
                                      for a in membership.servers]
        self._ids = itertools.count(1)
        self.pending: dict[int, Request] = {}
        self._introduced: set[int] = set()  # servers this worker's connection has introduced itself to
        self._rollback = 0  # the rollback epoch whose consequences this client has drawn
        self.on_rolled_back: Callable[[int], None] = lambda step: None
        self.on_server_moved: Callable[[int], None] = lambda server: None

    def next_id(self) -> int:
        return next(self._ids)

    def submit(self, request: Request, req: int, track: bool = False):
        """Send a request's frames to its server and await its answer as ``req``; returns the tracker."""
        self.catch_up()
        request.rollback = self._rollback
        request.sent_us = self.tracer.now_us()
        self.pending[req] = request
        request.future.expect()
        return self.send(request.server, request.frames, track=track)

    def send(self, server: int, frames: list, track: bool = False):
        """Send frames to a server, the connection's introduction first (``server/speakers.py``)."""
        sock = self.servers[server]
        if server not in self._introduced:
            introduce = P.Introduce(rank=self.membership.rank, token=self.membership.welcome.token)
            sock.send([P.encode(introduce)], check=self.membership.check)
            self._introduced.add(server)
        return sock.send(frames, check=self.membership.check, track=track)

    def progress(self, timeout: float) -> None:
        """Receive the replies that arrive within ``timeout`` seconds. Liveness is checked only when
        none is waiting: an answer already here is taken whatever happened since it came."""
        ready = self.transport.poll(self.servers, 0)
        if not ready:
            self.membership.check()
            ready = self.transport.poll(self.servers, timeout)
        for sock in ready:
            while self.transport.poll([sock], 0):
                self._receive_reply(sock)

    def await_reply(self, request: Request, timeout: float) -> bool:
        """Take in the replies of ``request``'s server until ``request`` is answered (at most
        ``timeout`` seconds, checking every slice that the job's nodes live); whether it was. Only
        that server's socket is read: for a restarted server's lanes, called while its moved
        socket is set up and before anything is resent to it."""
        sock = self.servers[request.server]
        deadline = time.monotonic() + timeout
        while not request.future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.membership.check()
            if self.transport.poll([sock], min(left, POLL_SLICE)):
                while self.transport.poll([sock], 0):
                    self._receive_reply(sock)
        return True

    def wait_until(self, done: Callable[[], bool], timeout: Optional[float]) -> None:
        """Receive replies until ``done()``; every slice checks that the job's nodes still live."""
        started, started_us = time.monotonic(), self.tracer.now_us()
        deadline = None if timeout is None else started + timeout
        self.catch_up()
        if done():
            return
        while not done():
            self._follow_moved_servers()
            if deadline is not None and time.monotonic() > deadline:
                raise PSTimeoutError(f"worker {self.membership.rank}: request not answered within {timeout} s")
            self.progress(POLL_SLICE)
        self.recorder.observe("psframework_worker_wait_seconds", time.monotonic() - started)
        self.tracer.complete("wait", started_us, "wait")

    @property
    def rollback(self) -> int:
        """The rollback epoch this client's requests are sent with."""
        return self._rollback

    def same_epoch(self, epoch: int) -> None:
        """Catch up with the job's rollbacks; ``RolledBackError`` if that moved past ``epoch`` (what
        began before must not go on half in the restored model: it is dropped whole)."""
        self.catch_up()
        if self._rollback != epoch:
            step = self.membership.rollback[1]
            raise RolledBackError(f"worker {self.membership.rank}: the job went back to the checkpoint of step "
                                  f"{step} while this exchange was being sent; it is dropped", step=step)

    def catch_up(self) -> None:
        """The job went back to a checkpoint (a server was restarted): fail what was sent before
        with a ``RolledBackError`` naming the step, and go on from that step."""
        epoch, step = self.membership.rollback
        if epoch <= self._rollback:
            return
        self._rollback = epoch
        stale = {req: r for req, r in self.pending.items() if r.rollback < epoch}
        for req, request in stale.items():
            del self.pending[req]
            if request.on_answer is not None:
                request.on_answer(request, None, False)
            request.future.abandon()
            request.future.resolve(RolledBackError(
                f"worker {self.membership.rank}: a server was restarted and the job went back to the checkpoint "
                f"of step {step}; pull the values again and go on from there", step=step))
        log.warning("worker %d: the job went back to step %d (a server was restarted)", self.membership.rank, step)
        self.on_rolled_back(step)

    def stats(self) -> list[dict]:
        """Every server's counters, by rank (``Worker.server_stats``)."""
        future = Future(self)
        requests = []
        for server in range(len(self.servers)):
            req = self.next_id()
            requests.append(Request(future, server, frames=[P.encode(P.Stats(req=req))]))
            self.submit(requests[-1], req)
        future.wait()
        return [dict(request.reply.counters) for request in requests]

    def wait_all(self, timeout: Optional[float] = None) -> None:
        self.wait_until(lambda: not self.pending, timeout)

    def fail_pending(self, why: str) -> None:
        """Resolve every request still awaiting an answer with a ``ClosedError``: nothing waits
        on an answer that can no longer come."""
        pending, self.pending = self.pending, {}
        for request in pending.values():
            if request.on_answer is not None:
                request.on_answer(request, None, False)
            request.future.abandon()
            request.future.resolve(ClosedError(f"worker {self.membership.rank} closed before server "
                                               f"{request.server} answered: {why}"))

    def _follow_moved_servers(self) -> None:
        """A restarted server listens at a new address: reconnect and resend what it never answered."""
        for rank, address in self.membership.moved_servers().items():
            resend = [r for r in self.pending.values() if r.server == rank]
            log.warning("worker %d: server %d restarted at %s; resending %d requests", self.membership.rank, rank,
                        address, len(resend))
            self.servers[rank].close()
            self.servers[rank] = self.transport.connect(address, max_message_bytes=self._max_message_bytes)
            self._introduced.discard(rank)
            self.on_server_moved(rank)  # its lane's attach goes first, so the resent requests find it
            still_pending = {id(r) for r in self.pending.values()}  # that took in replies (WorkerLanes.renew)
            for request in resend:
                if id(request) in still_pending:
                    self.send(rank, request.frames)

    def _receive_reply(self, sock: Socket) -> None:
        _, head = sock.recv_header()
        try:
            message = P.decode(head)
        except ProtocolError as exc:
            sock.skip_rest()
            log.warning("worker %d dropped a malformed reply from %s: %s", self.membership.rank, sock.address, exc)
            return
        request = self.pending.pop(getattr(message, "req", None), None)
        if request is None:
            sock.skip_rest()
            return
        if request.sent_us:
            self.tracer.complete(f"server {request.server}", request.sent_us, "request")
        if isinstance(message, P.Error):
            sock.skip_rest()
            if request.on_answer is not None:
                request.on_answer(request, message, False)
            request.future.resolve(error_for(message.kind, message.message, message.step))
            if message.kind == P.ROLLED_BACK:
                self.membership.note_rollback(message.rollback, message.step)
                self.catch_up()
            return
        request.reply = message
        error = None
        if request.on_answer is not None:
            sock.skip_rest()
            if isinstance(message, (P.Values, P.RowValues)) and not message.shm:
                error = ProtocolError(f"reply from {sock.address} came over the socket for a lane request")
            error = request.on_answer(request, message, error is None and not request.future.discards) or error
        elif isinstance(message, (P.Values, P.RowValues)) and not request.future.discards:
            error = self._receive_values(sock, request)
        sock.skip_rest()
        request.future.resolve(error)

    @staticmethod
    def _receive_values(sock: Socket, request: Request) -> Optional[PSError]:
        for view, landed in request.dest:
            got = sock.recv_into(view) if sock.more() else -1
            if got != len(view):
                return ProtocolError(f"reply from {sock.address} had a frame of {got} bytes, expected {len(view)}")
            if landed is not None:
                landed()
        return None

    def close(self) -> None:
        for sock in self.servers:
            sock.close()
        self.servers = []


__all__ = ["Client", "Future", "Request"]
