"""Readers: programs that read the job's values while it trains (``psframework/reader.py``).

A reader says hello like any node, with the job's secret, but it is no member of the job: it gets
no rank among the workers, is never counted in steps, barriers or elastic membership, sends no
heartbeats, and may come and go at any time. Its welcome waits until the tensors are registered
(the shard map says what there is to read); it carries a token that the servers check with the
reader key they got in their own welcome.
"""

from __future__ import annotations

import logging
from typing import Callable

from .. import protocol as P
from .registration import Registration
from .roster import Roster

log = logging.getLogger("psframework.scheduler")

Send = Callable[[bytes, P.Message], None]


class Readers:
    def __init__(self, roster: Roster, registration: Registration, send: Send):
        self.roster, self.registration = roster, registration
        self._send = send
        self._waiting: list[tuple[bytes, P.Hello]] = []  # hellos before the tensors were registered
        self._count = 0  # readers welcomed so far: the next one's id

    def on_hello(self, peer: bytes, hello: P.Hello) -> None:
        self._waiting.append((peer, hello))
        self.welcome_waiting()

    def welcome_waiting(self) -> None:
        """Welcome the readers that waited, once there is something to read."""
        if not self._waiting or not self.registration.done:
            return
        waiting, self._waiting = self._waiting, []
        for peer, hello in waiting:
            self._send(peer, self._welcome())
            log.info("reader %d from %s (pid %d) reads the job", self._count - 1, hello.host, hello.pid)

    def _welcome(self) -> P.ReaderWelcome:
        reader, config = self._count, self.roster.config
        self._count += 1
        return P.ReaderWelcome(reader=reader, token=P.reader_token(self.roster.reader_key, reader),
                               servers=self.roster.server_addresses(), shard_map=self.registration.shard_map,
                               mode=config.mode, host=config.host, version=P.VERSION,
                               heartbeat_timeout=config.timing.heartbeat_timeout,
                               max_message_bytes=config.max_message_bytes)

    def fail(self, message: str) -> None:
        """The job is over (or failed) before the readers that wait could be welcomed."""
        waiting, self._waiting = self._waiting, []
        for peer, _ in waiting:
            self._send(peer, P.Error(kind=P.PEER_LOST, message=message))


__all__ = ["Readers"]
