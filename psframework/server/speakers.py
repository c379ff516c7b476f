"""Who speaks on each connection to a server: no worker can act as another.

A worker's first message on a connection is an ``Introduce`` with the token the scheduler gave it
alone; the server checks it against the token's sha256, which it has from the scheduler (in its
welcome, or in the ``Activate`` of a worker that joined late), and binds the connection to that
worker. Every later message on the connection must speak for that worker and no other: the rank in
a request, an attach (a lane), a mark. A connection that has not introduced itself gets nothing, nor
does a worker the scheduler declared dead (the job went on without it), from the moment this server
hears of it until a new process takes its rank.

A reader (``psframework/reader.py``) introduces itself with ``IntroduceReader`` and a token made
from the reader key of the server's welcome; its connection may read, and nothing else.
"""

from __future__ import annotations

import logging
import secrets
from typing import Callable, Optional

from .. import protocol as P
from ..logs import RateLimitedLog

log = logging.getLogger("psframework.server")


class Speakers:
    def __init__(self, declared_dead: Callable[[int], bool] = lambda worker: False) -> None:
        self._declared_dead = declared_dead
        self._keys: dict[int, str] = {}  # worker -> sha256 of its token
        self._bound: dict[bytes, int] = {}  # connection -> the worker it introduced itself as
        self._reader_key = ""
        self._readers: dict[bytes, int] = {}  # connection -> the reader it introduced itself as
        self._refusals = RateLimitedLog(log)

    def know(self, keys: dict[int, str]) -> None:
        """Workers' keys: from the welcome, or a late worker's (whose earlier connections no longer count)."""
        for worker, key in keys.items():
            if self._keys.get(worker) != key:
                self._bound = {peer: rank for peer, rank in self._bound.items() if rank != worker}
            self._keys[worker] = key

    def introduce(self, peer: bytes, message: P.Introduce) -> None:
        key = self._keys.get(message.rank)
        if key is None or not secrets.compare_digest(key, P.token_key(message.token)):
            self._refusals.warning("refused a connection that introduced itself as worker %d without its token (%r)",
                                   message.rank, peer)
            return
        self._bound[peer] = message.rank

    def know_reader_key(self, key: str) -> None:
        self._reader_key = key

    def introduce_reader(self, peer: bytes, message: P.IntroduceReader) -> None:
        if not self._reader_key or message.reader < 0 or not secrets.compare_digest(
                P.reader_token(self._reader_key, message.reader), message.token):
            self._refusals.warning("refused a connection that introduced itself as reader %d without its token (%r)",
                                   message.reader, peer)
            return
        self._readers[peer] = message.reader

    def reader(self, peer: bytes, message: P.Message) -> int:
        """The reader ``peer`` introduced itself as; ``Rejected`` if it did not."""
        reader = self._readers.get(peer)
        if reader is None or getattr(message, "rank", reader) != reader:
            self._refusals.warning("refused %s from %r: not a reader's connection", type(message).__name__, peer)
            raise P.Rejected(P.PROTOCOL, "this connection did not introduce itself as this reader of the job")
        return reader

    def speaks_for(self, peer: bytes, rank: Optional[int]) -> bool:
        """Whether ``peer`` is the connection worker ``rank`` introduced itself on."""
        return rank is not None and self._bound.get(peer) == rank

    def check(self, peer: bytes, message: P.Message) -> None:
        """``Rejected`` unless ``peer`` introduced itself as the worker ``message`` speaks for."""
        claimed = getattr(message, "rank", None)
        bound = self._bound.get(peer)
        if bound is None and peer in self._readers:
            raise P.Rejected(P.PROTOCOL, f"a reader may only read; {type(message).__name__} is for workers")
        if bound is None:
            self._refusals.warning("refused %s from %r: the connection did not introduce itself", type(message).__name__,
                                   peer)
            raise P.Rejected(P.PROTOCOL, "this connection did not introduce itself as a worker of the job")
        if claimed is not None and claimed != bound:
            self._refusals.warning("refused %s from %r: it claims worker %d but introduced itself as worker %d",
                                   type(message).__name__, peer, claimed, bound)
            raise P.Rejected(P.PROTOCOL, f"a message for worker {claimed} on a connection of worker {bound}")
        if self._declared_dead(bound):
            self._refusals.warning("refused %s from worker %d: the scheduler declared it dead", type(message).__name__,
                                   bound)
            raise P.Rejected(P.PEER_LOST, f"worker {bound} was declared dead by the scheduler (its heartbeats "
                                          "stopped) and the job went on without it; the servers refuse its requests: "
                                          "end this process (a new worker may take its rank)")


__all__ = ["Speakers"]
