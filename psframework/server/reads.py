"""Readers' requests (``psframework/reader.py``): a block's values at a version, rows of tables.

A read waits in its block's pulls like a worker's pull, but for the block's version only: it is
answered (over the socket, from the values between two updates, so never torn) once the block has
applied at least ``at_least`` updates, and it is never counted in a step. A reader's new read of a
block replaces its read of that block still waiting: it gave that one up. A read of rows is answered
at once with the current rows, and never creates or admits one.
"""

from __future__ import annotations

from .. import protocol as P
from ..transport import Socket
from .answers import Answers
from .rows import RowPending, RowStore
from .store import DenseStore, Pending


class Reads:
    def __init__(self, data: Socket, store: DenseStore, rows: RowStore, answers: Answers):
        self.data, self.store, self.rows, self.answers = data, store, rows, answers
        self.count = 0  # reads answered or waiting

    def on_read(self, peer: bytes, reader: int, message: P.Read) -> None:
        self.data.skip_rest()
        state, segs = self.store.segments(message.block, message.segs)
        self.count += 1
        # a reader sends one batch at a time (reading.py): its read of this block still waiting is
        # one it gave up on, and its answer would be dropped
        state.pulls[:] = [pending for pending in state.pulls if not (pending.reader and pending.peer == peer)]
        state.pulls.append(Pending(peer, message.req, reader, segs, message.at_least, reader=True))
        self.answers.ready([state])

    def waiting(self) -> int:
        """Reads waiting for their block's version."""
        return sum(pending.reader for state in self.store.blocks.values() for pending in state.pulls)

    def on_read_rows(self, peer: bytes, reader: int, message: P.ReadRows) -> None:
        parts = self.rows.receive(message, self.data)
        self.count += 1
        channel = self.rows.channel
        channel.pulls.append(RowPending(peer, message.req, reader, 0, parts, train=False, reader=True))
        self.answers.ready([channel])


__all__ = ["Reads"]
