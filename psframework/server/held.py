"""Device-lane pushes that came before their worker's copies into the push slot landed.

A worker sends the header of a push through its device lane as soon as its copies into the push
slot are queued (``worker/exchange.py``), and the slot must not be read before the worker's push
event completed (``DeviceLane.wait_pushed``). Waiting for that in the loop would hold back every
other worker's requests for as long as this worker's GPU is busy (the tail of its backward pass),
so such a request is held here, with every later request of the same connection behind it (their
order is kept), and handled once its event completed, its worker's process is gone, or
``PEER_EVENT_DEADLINE`` passed: handling it then finds the event done, or reports why not.

Only requests of a bare header are held (the socket has nothing more of them to read). A message
with frames, or any other message from a connection with held requests, must be handled now: the
requests held before it are handled first, each waiting for its event as before.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Optional

from .. import protocol as P
from ..datapath.cuda_ipc import LIVENESS_EVERY, PEER_EVENT_DEADLINE, SPIN
from ..transport import Socket
from .lanes import ServerLanes
from .requests import Requests
from .speakers import Speakers

log = logging.getLogger("psframework.server")

class HeldRequests:
    def __init__(self, data: Socket, lanes: ServerLanes, requests: Requests, speakers: Speakers):
        self._data, self._lanes, self._requests, self._speakers = data, lanes, requests, speakers
        self._queues: dict[bytes, deque[tuple[P.BlockRequest, float]]] = {}
        self._last_hold = 0.0
        self._next_look = 0.0
        self.held = 0  # requests held so far (``server_stats()["held_requests"]``)

    @property
    def waiting(self) -> bool:
        return bool(self._queues)

    @property
    def spinning(self) -> bool:
        """A request was held a moment ago: device work takes microseconds, look again without pausing."""
        return bool(self._queues) and time.monotonic() - self._last_hold < SPIN

    def take(self, peer: bytes, message: P.Message, bare: bool) -> bool:
        """Whether ``message`` (its header read, ``bare`` if nothing more of it is on the socket)
        is held; if not, the requests held before it from ``peer`` have been handled."""
        queue = self._queues.get(peer)
        holdable = bare and _holdable(message)
        if queue is None and not (holdable and _unlanded(self._event(message))):
            return False
        if not holdable:
            self._flush(peer)
            return False
        self._speakers.check(peer, message)
        now = time.monotonic()
        self._queues.setdefault(peer, deque()).append((message, now))
        self._last_hold = now
        self.held += 1
        return True

    def release(self) -> None:
        """Handle the held requests whose turn came, in order for each connection."""
        now = time.monotonic()
        look = now >= self._next_look
        if look:
            self._next_look = now + LIVENESS_EVERY
        for peer in list(self._queues):
            queue = self._queues[peer]
            while queue and self._may_go(*queue[0], now, look):
                self._handle(peer, queue.popleft()[0])
            if not queue:
                del self._queues[peer]

    def counters(self) -> dict:
        return {"held_requests": self.held}

    def _may_go(self, message: P.BlockRequest, since: float, now: float, look: bool) -> bool:
        event = self._event(message)
        if not _unlanded(event) or now - since > PEER_EVENT_DEADLINE:
            return True
        lane = self._lanes.device_lanes.get(message.rank)
        return look and (lane is None or lane.peer is None or not lane.peer.running())

    def _flush(self, peer: bytes) -> None:
        for message, _ in self._queues.pop(peer, ()):
            self._handle(peer, message)

    def _handle(self, peer: bytes, message: P.BlockRequest) -> None:
        """Handle a held request; the socket may be inside another message, which is left alone."""
        try:
            self._speakers.check(peer, message)
            self._requests.on_block(peer, message, bare=True)
        except P.Rejected as exc:
            log.warning("rejected a held %s from %r: %s", type(message).__name__, peer, exc)
            self._data.send([P.encode(exc.reply(message.req))], peer=peer)

    def _event(self, message: P.Message):
        """The worker's push event that a device-lane push waits for (None for any other message)."""
        if not isinstance(message, (P.Push, P.PushPull)) or not message.ipc:
            return None
        lane = self._lanes.device_lanes.get(message.rank)
        return lane.pushed.get(message.block) if lane is not None else None


def _holdable(message: P.Message) -> bool:
    """A request whose handling reads nothing more from the socket: through a lane, or a pull."""
    return (isinstance(message, P.BlockRequest) and not isinstance(message, P.Init)
            and (message.ipc or message.shm or isinstance(message, P.Pull)))


def _unlanded(event: Optional[object]) -> bool:
    """Whether ``event`` (a worker's push event) has not completed yet."""
    if event is None:
        return False
    try:
        return not event.query()
    except RuntimeError:  # the context of a process that went away: handling the request says so
        return False


__all__ = ["HeldRequests"]
