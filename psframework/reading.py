"""A reader's connections to the servers (``reader.py``): introduced once, then batches of reads.

``exchange`` sends a batch of requests, each to its server, and takes their answers as they come,
in any order, until all are in or the deadline passes; a late answer to an earlier batch (one
that failed) is recognised by its request id and dropped.
"""

from __future__ import annotations

import itertools
import time
from typing import Callable, Optional

import msgspec
import torch

from . import protocol as P
from .buffers import byte_view
from .errors import ProtocolError, PSTimeoutError, error_for
from .node import POLL_SLICE
from .transport import Socket, Transport

# (server, request, its frames, what to do with the answer's frames, what it reads for messages)
Read = tuple[int, P.Message, list[torch.Tensor], Callable[[list], None], str]


class ServerLinks:
    def __init__(self, transport: Transport, welcome: P.ReaderWelcome, max_message_bytes: int):
        self.transport, self.max_message_bytes = transport, max_message_bytes
        self.reader, self.token = welcome.reader, welcome.token
        self.addresses: list[str] = []
        self.sockets: list[Socket] = []
        self._ids = itertools.count(1)
        self.move(welcome)

    def move(self, welcome: P.ReaderWelcome) -> bool:
        """Connect to the servers where ``welcome`` says they are (again, with its identity); True if
        one moved."""
        self.reader, self.token = welcome.reader, welcome.token
        moved = False
        for server, address in enumerate(welcome.servers):
            if server < len(self.addresses) and self.addresses[server] == address:
                self._introduce(self.sockets[server])
                continue
            moved = True
            if server < len(self.sockets):
                self.sockets[server].close()
            sock = self.transport.connect(address, max_message_bytes=self.max_message_bytes)
            self.sockets[server:server + 1] = [sock]
            self.addresses[server:server + 1] = [address]
            self._introduce(sock)
        return moved

    def _introduce(self, sock: Socket) -> None:
        sock.send([P.encode(P.IntroduceReader(reader=self.reader, token=self.token))])

    def exchange(self, reads: list[Read], deadline: float) -> list[P.Message]:
        """Send every read, then take the answers: each read's answer header, in order."""
        waiting: dict[int, int] = {}  # request id -> index in reads
        for i, (server, message, frames, _, _) in enumerate(reads):
            req = next(self._ids)
            self.sockets[server].send([P.encode(msgspec.structs.replace(message, req=req))] +
                                      [byte_view(f) for f in frames])
            waiting[req] = i
        answers: list[Optional[P.Message]] = [None] * len(reads)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._timeout(reads, waiting)
            for sock in self.transport.poll(self.sockets, min(left, POLL_SLICE)):
                self._drain(sock, reads, waiting, answers)
        return answers

    def _drain(self, sock: Socket, reads: list[Read], waiting: dict[int, int], answers: list) -> None:
        while self.transport.poll([sock], 0):
            _, head = sock.recv_header()
            answer = P.decode(head)
            i = waiting.pop(getattr(answer, "req", None), None)
            if i is None:
                sock.skip_rest()  # the answer to a read of a batch that failed
                continue
            server, _, _, take, what = reads[i]
            if isinstance(answer, P.Error):
                sock.skip_rest()
                raise error_for(answer.kind, f"server {server} ({self.addresses[server]}) refused reader "
                                             f"{self.reader}'s read of {what}: {answer.message}", answer.step)
            frames = []
            while sock.more():
                frames.append(sock.recv_buffer())
            try:
                take(frames)
            except (RuntimeError, ValueError) as exc:
                raise ProtocolError(f"server {server} answered reader {self.reader}'s read of {what} with frames "
                                    f"that do not fit: {exc}") from None
            answers[i] = answer

    def _timeout(self, reads: list[Read], waiting: dict[int, int]) -> PSTimeoutError:
        server, message, _, _, what = reads[next(iter(waiting.values()))]
        at = getattr(message, "at_least", 0)
        why = (f" (waiting for its version {at}: in sync mode, for the step every other block has; are the "
               "workers still training, and do they push every tensor each step?)" if at else "")
        return PSTimeoutError(f"reader {self.reader}: server {server} ({self.addresses[server]}) did not answer the "
                              f"read of {what} in time{why}; {len(waiting)} reads unanswered")

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.sockets = []


__all__ = ["Read", "ServerLinks"]
