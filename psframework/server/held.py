"""Device-lane pushes that came before their worker's copies into the push slot landed.

A worker sends the header of a push through its device lane as soon as its copies into the push
slot are queued (``worker/exchange.py``), and the slot must not be read before the worker's push
event completed (``DeviceLane.wait_pushed``). Waiting for that in the loop would hold back every
other worker's requests for as long as this worker's GPU is busy (the tail of its backward pass),
so such a request is held here, with every later request of the same connection behind it (their
order is kept), and handled once its event completed or its worker's process is gone (handling
it then finds the event done, or reports the death); one whose worker still runs but whose event
is pending after ``PEER_EVENT_DEADLINE`` is refused with a timeout.

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
from ..datapath.cuda_ipc import LIVENESS_EVERY, PEER_EVENT_DEADLINE, SPIN, DeviceLane
from ..transport import Socket
from .lanes import ServerLanes
from .requests import Requests
from .speakers import Speakers

log = logging.getLogger("psframework.server")


class HeldRequests:
    def __init__(self, data: Socket, lanes: ServerLanes, requests: Requests, speakers: Speakers):
        self._data, self._lanes, self._requests, self._speakers = data, lanes, requests, speakers
        # by connection: each held request, when it was held, and the device lane its event is of
        self._queues: dict[bytes, deque[tuple[P.BlockRequest, float, Optional[DeviceLane]]]] = {}
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
        if isinstance(message, P.MapExports) and not message.gone:
            return False  # it concerns later requests only: the held ones need not go first
        queue = self._queues.get(peer)
        holdable = bare and _holdable(message)
        lane = self._lane(message) if holdable else None
        if queue is None and not (lane is not None and _unlanded(_event(lane, message))):
            return False
        if not holdable:
            self._flush(peer)
            return False
        self._speakers.check(peer, message)
        now = time.monotonic()
        self._queues.setdefault(peer, deque()).append((message, now, lane))
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
            while queue:
                turn = _turn(*queue[0], now, look)
                if turn == "wait":
                    break
                message, _, lane = queue.popleft()
                self._handle(peer, message, lane, expired=turn == "expired")
            if not queue:
                del self._queues[peer]

    def counters(self) -> dict:
        return {"held_requests": self.held}

    def _flush(self, peer: bytes) -> None:
        for message, _, lane in self._queues.pop(peer, ()):
            self._handle(peer, message, lane)

    def _handle(self, peer: bytes, message: P.BlockRequest, lane: Optional[DeviceLane], expired: bool = False
                ) -> None:
        """Handle a held request (refused if ``expired``); the socket may be inside another
        message, which is left alone."""
        try:
            self._speakers.check(peer, message)
            if lane is not None and self._lanes.device_lanes.get(message.rank) is not lane:
                raise P.Rejected(P.PEER_LOST, f"the device lane of worker {message.rank} was closed while its "
                                              f"push of block {message.block} waited for its copies")
            if expired:
                raise P.Rejected(P.TIMEOUT, f"push of block {message.block}: worker {message.rank}'s copies into "
                                            f"its device lane have not landed in {PEER_EVENT_DEADLINE:.0f} s; its "
                                            "GPU may be hung (see nvidia-smi)")
            self._requests.on_block(peer, message, bare=True)
        except P.Rejected as exc:
            log.warning("rejected a held %s from %r: %s", type(message).__name__, peer, exc)
            if self._speakers.speaks_for(peer, message.rank):
                self._lanes.refused(message, lane)
            self._data.send([P.encode(exc.reply(message.req))], peer=peer)

    def _lane(self, message: P.BlockRequest) -> Optional[DeviceLane]:
        """The device lane a push came through (None for any other request)."""
        if not isinstance(message, (P.Push, P.PushPull)) or not message.ipc:
            return None
        return self._lanes.device_lanes.get(message.rank)


def _event(lane: Optional[DeviceLane], message: P.BlockRequest):
    """The worker's push event of ``message``'s block in ``lane`` (None once the lane is closed)."""
    return lane.pushed.get(message.block) if lane is not None else None


def _turn(message: P.BlockRequest, since: float, lane: Optional[DeviceLane], now: float, look: bool) -> str:
    """A held request's turn: "go" once its event completed (or it has none) or its worker's
    process is gone (looked at every LIVENESS_EVERY, and at the deadline: handling it then reports
    the death); "expired" once PEER_EVENT_DEADLINE passed with the worker running (refused, not
    waited for again); else "wait"."""
    if not _unlanded(_event(lane, message)):
        return "go"
    expired = now - since > PEER_EVENT_DEADLINE
    if (look or expired) and (lane.peer is None or not lane.peer.running()):
        return "go"
    return "expired" if expired else "wait"


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
