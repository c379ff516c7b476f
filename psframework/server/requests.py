"""A server's handling of workers' data requests: blocks (push, pull, push_pull, init) and rows.

Each request is resolved against its store (which block, which segments; which tables and ids),
its tensors are taken from the lane or the socket (compressed frames decoded:
``datapath/compression.py``), a push goes to the consistency policy, and a pull waits in its unit
until ``answers.Answers`` may answer it.
"""

from __future__ import annotations

from typing import Callable, Optional

from .. import protocol as P
from ..datapath.compression import wire_codecs
from ..metrics import Recorder
from ..trace import Tracer
from ..transport import Socket
from .answers import Answers, path_of
from .device import DeviceIO
from .lanes import ServerLanes
from .policy import Policy
from .rows import RowPending, RowPush, RowStore
from .store import BlockState, DenseStore, Pending


class Requests:
    def __init__(self, data: Socket, io: DeviceIO, lanes: ServerLanes, store: DenseStore, rows: RowStore,
                 policy: Policy, answers: Answers, num_workers: int, rank: int,
                 rollback: Callable[[int], None], recorder: Optional[Recorder] = None,
                 tracer: Optional[Tracer] = None):
        self.data, self.io, self.lanes, self.store, self.rows = data, io, lanes, store, rows
        self.recorder, self.tracer = recorder or Recorder(), tracer or Tracer(None)
        self.policy, self.answers = policy, answers
        self.num_workers, self.rank = num_workers, rank
        self._check_rollback = rollback  # raises for a request of an earlier rollback epoch

    def on_block(self, peer: bytes, request: P.BlockRequest, bare: bool = False) -> None:
        """Take in a block request whose header was read. ``bare``: one that was held
        (``held.py``), with no frames, while the socket may be inside another message."""
        if not self.tracer.enabled:
            return self._on_block(peer, request, bare)
        self.tracer.step = request.step if request.step >= 0 else self.tracer.step
        with self.tracer.span(f"{type(request).__name__} block {request.block}", "request", worker=request.rank,
                              step=request.step if request.step >= 0 else None):
            self._on_block(peer, request, bare)

    def _on_block(self, peer: bytes, request: P.BlockRequest, bare: bool) -> None:
        self._check_rollback(request.rollback)
        state, segs, present = self.store.resolve(request, self.num_workers)
        pushes = not isinstance(request, P.Pull)
        if pushes:
            self.policy.more_follow(request.rank, request.more)
            self.answers.fail(self.policy.went_on(request.rank, request.step))
        lane = self.lanes.lane_for(request, not bare and self.data.more(), self.rank)
        codecs, pull_codecs = self._codecs(request, state, segs, present, lane is not None)
        if isinstance(request, P.Init):
            self._init(peer, state, segs, request)
            return
        source, into = self.lanes.direct_views(request, lane, state)
        pushed = None
        if pushes:
            before = self.io.push_bytes
            pushed = (self.lanes.pushed(state, present, lane, held=isinstance(request, P.PushPull), rank=request.rank,
                                        source=source)
                      if lane is not None else self.io.receive_frames(state, present, codecs))
            self._count_push(lane, sum(state.nbytes[i] for i in present) if lane is not None
                             else self.io.push_bytes - before)
            self._push(state, pushed, request)
        elif not bare:
            self.data.skip_rest()
        if isinstance(request, P.Push):
            # a lane's push slot is reused once acknowledged: on a GPU, after the upload out of it
            self.io.answer(peer, [P.encode(P.Ack(req=request.req))], after=pushed.uploaded)
        else:
            state.pulls.append(Pending(peer, request.req, request.rank, segs, state.clocks[request.rank],
                                       lane=lane, codecs=pull_codecs,
                                       shared=request.shared and self.policy.shares_values,
                                       flag=request.flag if lane is not None and lane.on_device else 0,
                                       block=request.block, into=into))
        self.answers.ready([state])

    def _count_push(self, lane, nbytes: int) -> None:
        self.recorder.add("psframework_server_push_bytes", nbytes)
        self.recorder.add("psframework_data_path_bytes", nbytes, label=path_of(lane))

    @staticmethod
    def _codecs(request: P.BlockRequest, state: BlockState, segs: list[int], present: list[int], lane: bool):
        """The codecs of the pushed frames and of the answer's, by segment; ``Rejected`` if they do not fit."""
        pushes = isinstance(request, (P.Push, P.PushPull))
        if not request.codecs and not request.pull_codecs:
            return [None] * len(present) if pushes else [], []
        what = f"{type(request).__name__} of {state.describe()}"
        pulls = isinstance(request, (P.Pull, P.PushPull))
        if (request.codecs and (lane or not pushes)) or (request.pull_codecs and (lane or not pulls)):
            raise P.Rejected(P.BAD_REQUEST, f"{what}: codecs only for what a socket request sends or is answered")
        dtype = state.block.dtype
        return (wire_codecs(request.codecs, len(present), what, dtype) if pushes else [],
                wire_codecs(request.pull_codecs, len(segs), what, dtype, pulls=True) if request.pull_codecs else [])

    def _push(self, unit, pushed, request) -> None:
        try:
            self.policy.push(unit, pushed, request.rank, request.step)
        except P.Rejected as exc:
            self.answers.fail([(unit, str(exc))])
            raise

    def _init(self, peer: bytes, state: BlockState, segs: list[int], request: P.Init) -> None:
        pushed = self.io.receive_frames(state, segs)
        self.io.order_after_upload(pushed)
        self.store.write(state, pushed.grads)
        self.data.send([P.encode(P.Ack(req=request.req))], peer=peer)

    def on_rows(self, peer: bytes, request: P.RowRequest) -> None:
        self._check_rollback(request.rollback)
        lane = self.lanes.row_lane(request, self.data.more(), self.rank)
        parts = self.rows.receive(request, self.data, lane)
        channel = self.rows.channel
        if channel.broken is not None:
            raise P.Rejected(P.CONFIG, channel.broken)
        if not 0 <= request.rank < self.num_workers:
            raise P.Rejected(P.BAD_REQUEST, f"bad worker rank {request.rank}")
        if isinstance(request, P.InitRows):
            self.rows.load(parts)
            self.data.send([P.encode(P.Ack(req=request.req))], peer=peer)
            return
        if isinstance(request, P.PushRows):
            self._count_push(lane, sum(ids.numel() * ids.element_size() + grads.numel() * grads.element_size()
                                       for _, ids, grads in parts))
            self.answers.fail(self.policy.went_on(request.rank, request.step))
            self._push(channel, RowPush(parts), request)
            self.data.send([P.encode(P.Ack(req=request.req))], peer=peer)
        else:
            need = channel.clocks[request.rank] + request.after
            channel.pulls.append(RowPending(peer, request.req, request.rank, need, parts, request.train, lane))
        self.answers.ready([channel])


__all__ = ["Requests"]
