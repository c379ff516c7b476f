"""Reply credits: how much a peer can make a server hold in answers it has not read.

Values go out zero-copy: until ZeroMQ has handed a reply's bytes to the kernel, the reply keeps
the memory it was sent from alive (a block's values, which an update then moves to a copy; or a
GPU block's pinned reply buffer). A peer that sends pulls and reads no answer (stopped, flooding)
would make that grow without bound. So each peer has a budget of reply bytes in flight; a pull
answered beyond it waits (it costs a few bytes of bookkeeping, no tensor memory) and goes out,
with the values current by then, once earlier replies to that peer have left. A peer with more
waiting pulls than ``max_deferred`` gets an error instead. Small messages (acknowledgements, errors)
are bounded by the socket's high-water mark (``transport.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Any

DEFAULT_MAX_DEFERRED = 4096


class ReplyCredits:
    """``peer_budget`` bytes in flight per peer (``PS_PEER_BUFFER_BYTES``), four times that in all."""

    def __init__(self, peer_budget: int, max_deferred: int = DEFAULT_MAX_DEFERRED):
        self.peer_budget = peer_budget
        self.total_budget = 4 * peer_budget
        self.max_deferred = max_deferred
        self._inflight: dict[bytes, list[tuple[Any, int]]] = {}  # peer -> (tracker, bytes) of unsent replies
        self._bytes: dict[bytes, int] = {}
        self._total = 0
        self._deferred: dict[bytes, deque] = {}
        self.deferrals = 0  # replies that had to wait for room

    def room(self, peer: bytes, nbytes: int) -> bool:
        """Whether a reply of ``nbytes`` to ``peer`` may go now. A peer with nothing in flight always
        gets one (however large), so nobody starves; the others within the budgets."""
        held = self._bytes.get(peer, 0)
        if held == 0 and not self._deferred.get(peer):
            return True
        return held + nbytes <= self.peer_budget and self._total + nbytes <= self.total_budget

    def sent(self, peer: bytes, nbytes: int, tracker) -> None:
        """A reply of ``nbytes`` went to ZeroMQ; ``tracker`` says when it has left (None: copied, gone)."""
        if tracker is None or tracker.done:
            return
        self._inflight.setdefault(peer, []).append((tracker, nbytes))
        self._bytes[peer] = self._bytes.get(peer, 0) + nbytes
        self._total += nbytes

    def defer(self, peer: bytes, item: Any) -> bool:
        """Keep ``item`` until ``peer`` has room; False if it already has too many waiting."""
        waiting = self._deferred.setdefault(peer, deque())
        if len(waiting) >= self.max_deferred:
            return False
        waiting.append(item)
        self.deferrals += 1
        return True

    def release(self, everything: bool = False) -> list[Any]:
        """Forget the replies that have left; the deferred items of peers that now have room (or all
        of them, with ``everything``), oldest first (the caller tries each again)."""
        freed = set()
        for peer, flights in list(self._inflight.items()):
            done = [(t, n) for t, n in flights if t.done]
            if not done:
                continue
            for _, n in done:
                self._bytes[peer] -= n
                self._total -= n
            self._inflight[peer] = [(t, n) for t, n in flights if not t.done]
            if not self._inflight[peer]:
                del self._inflight[peer], self._bytes[peer]
            freed.add(peer)
        ready = []
        for peer in list(self._deferred):
            if everything or peer in freed or peer not in self._bytes:
                ready.extend(self._deferred.pop(peer))
        return ready

    @property
    def deferred(self) -> int:
        """Answers held back until their peers have room."""
        return sum(len(items) for items in list(self._deferred.values()))

    @property
    def waiting(self) -> bool:
        """Deferred replies wait for earlier ones to leave."""
        return bool(self._deferred)


__all__ = ["DEFAULT_MAX_DEFERRED", "ReplyCredits"]
