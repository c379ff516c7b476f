"""The transport seam: ZeroMQ for real, an in-process fake for unit tests.

A listening socket (ZeroMQ ROUTER) talks to many peers and names the peer of each message; a
connected socket (ZeroMQ DEALER) talks to one listener. Receiving is streamed so that tensor
payloads land directly in preallocated memory::

    peer, header = sock.recv_header()      # the header frame, after poll() said ready
    while sock.more():
        sock.recv_into(buffer_for_next_frame)

>>> t = MemoryTransport()
>>> server = t.listen("127.0.0.1")
>>> client = t.connect(server.address)
>>> client.send([b"hello"])
>>> peer, head = server.recv_header(); head
b'hello'
>>> t.close()
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

import zmq

from .errors import ClosedError, ProtocolError
from .logs import RateLimitedLog

_log = logging.getLogger("psframework.transport")

Frames = Sequence[object]  # bytes, bytearray or memoryview
LivenessCheck = Optional[Callable[[], None]]


class Socket:
    """Interface shared by both transports."""

    address: str
    dropped: int = 0  # messages a listening socket dropped: to peers that were gone or read nothing

    def send(self, frames: Frames, *, peer: Optional[bytes] = None, track: bool = False,
             check: LivenessCheck = None):
        raise NotImplementedError

    def recv_header(self) -> tuple[Optional[bytes], bytes]:
        raise NotImplementedError

    def more(self) -> bool:
        raise NotImplementedError

    def recv_frame(self) -> bytes:
        raise NotImplementedError

    def recv_into(self, buffer: memoryview) -> int:
        raise NotImplementedError

    def recv_buffer(self) -> object:
        """The next frame as a writable buffer owned by the caller, received without a copy."""
        raise NotImplementedError

    def skip_rest(self) -> int:
        skipped = 0
        while self.more():
            self.recv_frame()
            skipped += 1
        return skipped

    def recv_all(self) -> list[bytes]:
        frames = []
        while self.more():
            frames.append(self.recv_frame())
        return frames

    def close(self) -> None:
        raise NotImplementedError


class Transport:
    def listen(self, host: str, port: int = 0, max_message_bytes: int = -1) -> Socket:
        raise NotImplementedError

    def connect(self, address: str, max_message_bytes: int = -1) -> Socket:
        raise NotImplementedError

    def poll(self, sockets: Sequence[Socket], timeout: float) -> list[Socket]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- ZeroMQ

_COPY_THRESHOLD = 64 << 10  # below this pyzmq's copying send is cheaper than zero-copy bookkeeping
TERM_TIMEOUT = 5.0  # seconds close() waits for the sockets of a context to be closed
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # for poll(timeout=0)
# Messages a listening socket queues for one peer: only a peer that reads nothing reaches it (its
# data-carrying replies are bounded in bytes by server/credits.py), and then what follows is dropped
ROUTER_SNDHWM = 65536
# Messages it queues from one peer before it stops reading that connection (TCP then holds the peer
# back; nothing is lost): at most this many times the largest message a peer may send
ROUTER_RCVHWM = 64
_dropped_log = RateLimitedLog(_log)


def _tcp_url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class ZmqSocket(Socket):
    def __init__(self, sock: zmq.Socket, address: str, is_router: bool):
        self._sock = sock
        self.address = address
        self._is_router = is_router
        self.dropped = 0  # messages to peers that were gone or read nothing

    def send(self, frames, *, peer=None, track=False, check=None):
        if self._is_router and not self._route(peer):
            return None
        parts = list(frames)
        last = len(parts) - 1
        tracker = None
        for i, part in enumerate(parts):
            flags = zmq.SNDMORE if i < last else 0
            # tracked sends (values, which memory must outlive) go zero-copy whatever their size,
            # so that the tracker says when all of it has left; the header frame is always copied
            zero_copy = len(memoryview(part)) >= _COPY_THRESHOLD or (track and i > 0)
            result = self._send_part(part, flags, copy=not zero_copy, track=track and zero_copy, check=check)
            if result is not None:
                tracker = result
        return tracker

    def _route(self, peer: bytes) -> bool:
        """Start a message to ``peer``; False (the message is dropped) if that peer is gone or has
        ``ROUTER_SNDHWM`` messages queued that it does not read: a listener never blocks on one peer."""
        try:
            self._sock.send(peer, zmq.SNDMORE | zmq.NOBLOCK)
            return True
        except zmq.Again:
            self.dropped += 1
            _dropped_log.warning("dropped a message to peer %r: it has %d unread messages queued", peer, ROUTER_SNDHWM)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EHOSTUNREACH:
                raise
            self.dropped += 1  # the peer disconnected; nobody is there to answer
        return False

    def _send_part(self, part, flags, copy, track, check):
        while True:
            try:
                return self._sock.send(part, flags | zmq.NOBLOCK, copy=copy, track=track)
            except zmq.Again:
                # the peer is slow or gone: wait for room, but keep asking whether it still lives
                if check is not None:
                    check()
                self._sock.poll(100, zmq.POLLOUT)

    def recv_header(self):
        peer = self._sock.recv() if self._is_router else None
        if self._is_router and not self._sock.getsockopt(zmq.RCVMORE):
            raise ProtocolError("message with no frame after the peer identity")
        return peer, self._sock.recv()

    def more(self):
        return bool(self._sock.getsockopt(zmq.RCVMORE))

    def recv_frame(self):
        return self._sock.recv()

    def recv_into(self, buffer):
        return self._sock.recv_into(buffer)

    def recv_buffer(self):
        return self._sock.recv(copy=False)  # a zmq.Frame: writable, freed when the last view goes

    def fileno_socket(self) -> zmq.Socket:
        return self._sock

    def close(self):
        self._sock.close(linger=0)


class ZmqTransport(Transport):
    """Real sockets. One zmq context per transport, closed with it."""

    def __init__(self, io_threads: int = 1, secret=None):
        self._context = zmq.Context(io_threads=io_threads)
        self._lock = threading.Lock()
        self._secret = secret
        self._authenticator = None
        self._watcher: Optional[_HandshakeWatcher] = None

    def _socket(self, kind: int, max_message_bytes: int) -> zmq.Socket:
        with self._lock:
            sock = self._context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        if max_message_bytes > 0:
            sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
        return sock

    def listen(self, host, port=0, max_message_bytes=-1):
        sock = self._socket(zmq.ROUTER, max_message_bytes)
        key = self._secure_listener(sock) if self._secret is not None else ""
        # bounded queues per peer: a peer that floods us, or reads nothing, cannot make us hold
        # more than this many messages for it (large replies are also bounded by server/credits.py)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.setsockopt(zmq.SNDHWM, ROUTER_SNDHWM)
        sock.setsockopt(zmq.RCVHWM, ROUTER_RCVHWM)
        try:
            if port:
                sock.bind(_tcp_url(host, port))
            else:
                port = sock.bind_to_random_port(_tcp_url(host, 0).rsplit(":", 1)[0])
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise OSError(f"cannot bind {_tcp_url(host, port)}: {exc}") from None
        address = _tcp_url(host, port) + (f"#{key}" if key else "")
        return ZmqSocket(sock, address, is_router=True)

    def connect(self, address, max_message_bytes=-1):
        """Connect to ``address``: ``tcp://HOST:PORT``, with ``#KEY`` where the listener has a key."""
        sock = self._socket(zmq.DEALER, max_message_bytes)
        endpoint, _, key = address.partition("#")
        try:
            if self._secret is not None:
                self._secret.secure_client(sock, key)
            sock.connect(endpoint)
        except BaseException:
            sock.close(linger=0)
            raise
        return ZmqSocket(sock, address, is_router=False)

    def poll(self, sockets, timeout):
        if timeout <= 0:
            # the hot path asks "anything more?" once per message; ZMQ_EVENTS answers without a Poller
            # (plain ints: ``int & zmq.POLLIN`` goes through the enum machinery, a microsecond a call)
            return [s for s in sockets if s.fileno_socket().getsockopt(_EVENTS) & _POLLIN]
        poller = zmq.Poller()
        by_zmq = {}
        for s in sockets:
            zs = s.fileno_socket()
            by_zmq[zs] = s
            poller.register(zs, zmq.POLLIN)
        ready = dict(poller.poll(max(0, int(timeout * 1000))))
        return [by_zmq[zs] for zs in ready]

    def _secure_listener(self, sock: zmq.Socket) -> str:
        with self._lock:
            if self._authenticator is None:
                self._authenticator = self._secret.start_authenticator(self._context)
                self._watcher = _HandshakeWatcher()
        key = self._secret.secure_listener(sock)
        self._watcher.watch(sock)
        return key

    @property
    def refused_handshakes(self) -> int:
        return self._watcher.failures if self._watcher else 0

    def close(self, timeout: float = TERM_TIMEOUT):
        """Stop the authenticator and end the context. ``term()`` waits for every socket of the
        context to be closed; one left open by a thread that did not stop must not hang us, so
        the wait has a deadline (the context is then left to the process's exit)."""
        if self._watcher is not None:
            self._watcher.stop()
        if self._authenticator is not None:
            self._authenticator.stop()
        closer = threading.Thread(target=self._context.term, name="ps-zmq-term", daemon=True)
        closer.start()
        closer.join(timeout)
        if closer.is_alive():
            _log.error("a ZeroMQ socket is still open %.0f s after closing (a thread that did not stop holds it); "
                       "not waiting for it", timeout)


class _HandshakeWatcher:
    """Logs peers that fail the security handshake (no secret, wrong mechanism), which never
    reach the ZAP authenticator. Owns one thread and the monitor sockets it reads."""

    _EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
               | zmq.EVENT_HANDSHAKE_FAILED_AUTH)

    def __init__(self):
        self._refusals = RateLimitedLog(_log)
        self._monitors: list[zmq.Socket] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ps-handshake-watch", daemon=True)
        self._thread.start()

    def watch(self, sock: zmq.Socket) -> None:
        with self._lock:
            self._monitors.append(sock.get_monitor_socket(self._EVENTS))

    def _run(self) -> None:
        from zmq.utils.monitor import recv_monitor_message

        while not self._stop.is_set():
            with self._lock:
                monitors = list(self._monitors)
            if not monitors:
                self._stop.wait(0.1)
                continue
            ready, _, _ = zmq.select(monitors, [], [], 0.1)
            for monitor in ready:
                event = recv_monitor_message(monitor)
                self._refusals.warning("refused a peer that failed the security handshake on %s",
                                       event.get("endpoint", b"?").decode(errors="replace"))

    @property
    def failures(self) -> int:
        return self._refusals.count

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with self._lock:
            for monitor in self._monitors:
                monitor.close(linger=0)
            self._monitors.clear()


# ----------------------------------------------------------------------------- in-process fake


class _DoneTracker:
    done = True

    def wait(self, timeout=None):
        return None


class _MemorySocket(Socket):
    def __init__(self, hub: "MemoryTransport", address: str, is_router: bool, identity: bytes):
        self._hub = hub
        self.address = address
        self._is_router = is_router
        self.identity = identity
        self.inbox: deque[tuple[bytes, list[bytes]]] = deque()
        self._current: deque[bytes] = deque()
        self.remote: Optional[_MemorySocket] = None
        self.closed = False

    def send(self, frames, *, peer=None, track=False, check=None):
        copied = [bytes(memoryview(f)) for f in frames]
        with self._hub.cond:
            if self.closed:
                raise ClosedError(f"socket {self.address} is closed")
            target = self._hub.peers.get(peer) if self._is_router else self._hub.listeners.get(self.address)
            if target is not None and not target.closed:
                target.inbox.append((self.identity, copied))
                self._hub.cond.notify_all()
        return _DoneTracker() if track else None

    def recv_header(self):
        with self._hub.cond:
            identity, frames = self.inbox.popleft()
        self._current = deque(frames)
        return (identity if self._is_router else None), self._current.popleft()

    def more(self):
        return bool(self._current)

    def recv_frame(self):
        return self._current.popleft()

    def recv_into(self, buffer):
        frame = self._current.popleft()
        view = memoryview(buffer).cast("B")
        n = min(len(frame), len(view))
        view[:n] = frame[:n]
        return len(frame)

    def recv_buffer(self):
        return bytearray(self._current.popleft())

    def close(self):
        with self._hub.cond:
            self.closed = True
            self._hub.listeners.pop(self.address, None) if self._is_router else None


class MemoryTransport(Transport):
    """An in-process stand-in with the same semantics, for fast unit tests of node logic."""

    _ports = itertools.count(1)

    def __init__(self):
        self.cond = threading.Condition()
        self.listeners: dict[str, _MemorySocket] = {}
        self.peers: dict[bytes, _MemorySocket] = {}
        self._ids = itertools.count()

    def listen(self, host, port=0, max_message_bytes=-1):
        address = f"mem://{host}:{port or next(self._ports)}"
        sock = _MemorySocket(self, address, True, b"")
        with self.cond:
            self.listeners[address] = sock
        return sock

    def connect(self, address, max_message_bytes=-1):
        identity = b"peer-%d" % next(self._ids)
        sock = _MemorySocket(self, address, False, identity)
        with self.cond:
            self.peers[identity] = sock
        return sock

    def poll(self, sockets, timeout):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                ready = [s for s in sockets if s.inbox]
                remaining = deadline - time.monotonic()
                if ready or remaining <= 0:
                    return ready
                self.cond.wait(remaining)

    def close(self):
        with self.cond:
            self.listeners.clear()
            self.peers.clear()
