"""Answering pulls: when the policy allows, through the lane or the socket, within the peer's credits.

A pull waits in its unit's ``pulls`` (a block's, or the row channel's) until the policy says it may
be answered; then its values go out through the worker's lane, or over the socket as long as the
peer's reply credits allow (``credits.py``; beyond them it waits, as bookkeeping only). Waits that
can never be answered (a worker left, the job rolled back, the workers push different tensors)
are answered with an error instead.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

from .. import protocol as P
from ..compress import payload_bytes
from ..metrics import Recorder
from ..trace import Tracer
from ..transport import Socket
from .credits import ReplyCredits
from .device import DeviceIO
from .lanes import ServerLanes
from .policy import Policy
from .rows import RowPending, RowStore


def path_of(lane: Any) -> str:
    """The data path of a request or answer, as the metrics name it."""
    return "socket" if lane is None else "cuda_ipc" if lane.on_device else "lane"


class Answers:
    def __init__(self, data: Socket, io: DeviceIO, lanes: ServerLanes, rows: RowStore, policy: Policy,
                 credits: ReplyCredits, rank: int, recorder: Optional[Recorder] = None,
                 tracer: Optional[Tracer] = None):
        self.data, self.io, self.lanes, self.rows = data, io, lanes, rows
        self.policy, self.credits, self.rank = policy, credits, rank
        self.recorder, self.tracer = recorder or Recorder(), tracer or Tracer(None)
        self.rollback = 0  # the job's rollback epoch, named in every answer of values
        self.pull_bytes = 0  # of the values answered, as sent (rounded pulls: their payloads)

    def ready(self, units: Iterable[Any]) -> None:
        """Answer the waiting pulls of these units that the policy now allows."""
        for unit in units:
            waiting = []
            # workers' answers first: a reader never holds back a step
            for pending in sorted(unit.pulls, key=lambda p: p.reader):
                if unit.version >= pending.need_version if pending.reader else self.policy.pull_ready(unit, pending):
                    self.send(unit, pending)
                else:
                    waiting.append(pending)
            unit.pulls = waiting

    def send(self, unit: Any, pending: Any) -> None:
        if not self.tracer.enabled:
            return self._send(unit, pending)
        with self.tracer.span(f"answer {unit.describe()}", "answer", worker=pending.rank):
            self._send(unit, pending)

    def _send(self, unit: Any, pending: Any) -> None:
        if isinstance(pending, RowPending) and pending.lane is not None:
            shapes = self.rows.shapes(pending)
            self._count_pull(pending, sum(count * dim * 4 for count, dim in shapes))
            self.lanes.answer_rows(pending, shapes, lambda into: self.rows.lookup(pending, into), unit.version)
            return
        if isinstance(pending, RowPending):
            rows = self.rows.lookup(pending)
            head = P.encode(P.RowValues(req=pending.req, version=unit.version))
            nbytes = sum(r.numel() * r.element_size() for r in rows)
            self._count_pull(pending, nbytes)
            self._within_credits(unit, pending, nbytes, lambda on_sent: self.io.send_rows(pending, head, rows, on_sent))
            return
        through_lane = pending.lane is not None
        values = P.Values(req=pending.req, version=unit.version, min_clock=min(unit.clocks), shm=through_lane,
                          shared=through_lane and pending.shared and unit.shared, rollback=self.rollback)
        nbytes = sum(payload_bytes(codec, unit.params[i].numel(), unit.params[i].element_size())
                     for i, codec in pending.segment_codecs())
        self._count_pull(pending, nbytes)
        if pending.lane is not None:
            self.lanes.answer(unit, pending, values)
            return
        self._within_credits(unit, pending, nbytes,
                             lambda on_sent: self.io.send_values(unit, pending, P.encode(values), on_sent))

    def _count_pull(self, pending: Any, nbytes: int) -> None:
        self.pull_bytes += nbytes
        self.recorder.add("psframework_server_pull_bytes", nbytes)
        self.recorder.add("psframework_data_path_bytes", nbytes, label=path_of(pending.lane))

    def _within_credits(self, unit: Any, pending: Any, nbytes: int, send: Callable) -> None:
        if not self.credits.room(pending.peer, nbytes):
            if not self.credits.defer(pending.peer, (unit, pending)):
                who = f"{'reader' if pending.reader else 'worker'} {pending.rank}"
                why = (f"{who} has {self.credits.max_deferred} pulls waiting for it to read earlier "
                       "answers; read your answers (wait() for your futures)")
                self.error(pending, P.Rejected(P.BAD_REQUEST, why))
            return
        send(lambda tracker: self.credits.sent(pending.peer, nbytes, tracker))

    def release_deferred(self) -> None:
        """Send the deferred answers whose peers have room again."""
        for unit, pending in self.credits.release():
            self.send(unit, pending)

    def error(self, pending: Any, error: P.Rejected) -> None:
        self.lanes.refused_pending(pending)
        self.data.send([P.encode(error.reply(pending.req))], peer=pending.peer)

    def fail(self, failed: list[tuple[Any, str]]) -> None:
        """These units can never complete a step: answer their waits, and every later request, with why."""
        for unit, why in failed:
            unit.broken = why
            for pending in unit.pulls:
                self.error(pending, P.Rejected(P.CONFIG, why))
            unit.pulls = []

    def fail_all(self, units: Iterable[Any], error: P.Rejected) -> None:
        """Every waiting pull, deferred ones too, gets ``error``."""
        units = list(units)
        waiting = [pending for unit in units for pending in unit.pulls]
        waiting += [pending for _, pending in self.credits.release(everything=True)]
        for unit in units:
            unit.pulls = []
        for pending in waiting:
            self.error(pending, error)

    def fail_impossible(self, units: Iterable[Any], gone: dict[int, str]) -> None:
        """Answer waits that can never be satisfied because a worker left or died."""
        units = list(units)
        for unit in units:
            still = []
            for pending in unit.pulls:
                reason = None if pending.reader else self.policy.impossible(unit, pending, gone)
                if reason is None:
                    still.append(pending)
                else:
                    self.error(pending, P.Rejected(P.PEER_LOST, reason))
            unit.pulls = still
        self.ready(units)


__all__ = ["Answers"]
