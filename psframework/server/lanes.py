"""The server's end of the lanes: shared memory (``datapath/lane.py``) and CUDA IPC (``datapath/cuda_ipc.py``).

A worker on the server's host offers its lane with an ``Attach``, and a GPU worker then its device
lane with an ``AttachDevice``; a request that says ``shm`` (or ``ipc``) then carries no frames: its
gradients are in the worker's push slot of the block, and its values are written into the pull
slot before the answer (a bare header) goes out. Row requests of tables do the same in the lane's
row areas.

A worker that offers the direct exchange (``direct`` in its ``Attach``/``AttachDevice``) may name
in a ``PushPull`` of a whole block where its gradients and destination lie in its memory
(``BlockRequest.direct``): we step by a view of its gradients where they lie and write our values
straight into its destination, and the block's slots are not used (``datapath/exports.py``).
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Iterable, Optional

import torch

from .. import protocol as P
from ..datapath.cuda_ipc import DeviceLane
from ..datapath.exports import DeviceOpener, HostOpener, MappedExports
from ..datapath.lane import ROW_PULLS, TOKEN_BYTES, Lane, Slots
from ..datapath.memops import memops
from ..datapath.peer_process import start_time
from ..datapath.values import ordered_stores, values_name
from ..errors import ConfigError, PSTimeoutError
from .device import DeviceIO
from .store import BlockState, DenseStore, Pending, Pushed

log = logging.getLogger("psframework.server")


class ServerLanes:
    def __init__(self, io: DeviceIO, device: torch.device):
        self.io = io
        self.device = device
        self.lanes: dict[int, Lane] = {}  # by worker rank
        self.device_lanes: dict[int, DeviceLane] = {}  # by worker rank
        self.requests = 0  # that came through a lane
        self.ipc_requests = 0  # that came through a device lane
        self.shared_answers = 0  # that left the values in our shared values
        self.direct_requests = 0  # that named regions of the worker's memory (``direct_views``)
        # the workers' memory we mapped, by (worker rank, on a GPU): host and device exports are apart
        self.mapped: dict[tuple[int, bool], MappedExports] = {}
        self.exports_opened = 0  # of the workers' memory, since we started
        self.exports_refused = 0  # that we could not map

    def attach(self, message: P.Attach, blocks: list[tuple[int, int]], num_workers: int, server: int) -> None:
        """Map a worker's lane; ``Rejected`` (the worker goes on over the socket) if we cannot."""
        if not 0 <= message.rank < num_workers:
            raise P.Rejected(P.BAD_REQUEST, f"attach from an unknown worker rank {message.rank}")
        try:
            lane = Lane.attach(message.path, message.token, blocks, message.row_bytes)
            if self.device.type == "cuda":
                lane.pin(self.device)
        except Exception as exc:  # whatever the reason, the worker goes on over the socket
            raise P.Rejected(P.BAD_REQUEST, f"server {server} cannot map lane {message.path}: {exc}") from None
        _replace(self.lanes, message.rank, lane)
        self._close_mapped(message.rank, on_device=False)
        if message.direct:  # a file of its we could map as the lane: its shared memory maps the same way
            self.mapped[(message.rank, False)] = MappedExports(HostOpener(), message.rank)

    def attach_device(self, message: P.AttachDevice, blocks: list[tuple[int, int]], num_workers: int,
                      server: int) -> P.Attached:
        """Map a worker's device lane by CUDA IPC, and answer with the handles of our events for it;
        ``Rejected`` (it goes on through its lane) if we cannot."""
        if not 0 <= message.rank < num_workers or message.rank not in self.lanes:
            raise P.Rejected(P.BAD_REQUEST, f"device lane from worker {message.rank}, which has no lane here")
        if self.device.type != "cuda":
            raise P.Rejected(P.BAD_REQUEST, f"server {server} keeps its shards on {self.device}, not on a GPU")
        lane = None
        try:
            lane = DeviceLane.attach(message, blocks, self.device)
            events = lane.make_events(self.device)
        except Exception as exc:  # whatever the reason, the worker goes on through its lane
            if lane is not None:
                lane.close()
            raise P.Rejected(P.BAD_REQUEST, f"server {server} on {self.device} cannot map the device lane of "
                                            f"worker {message.rank}: {exc}") from None
        _replace(self.device_lanes, message.rank, lane)
        self._close_mapped(message.rank, on_device=True)
        direct = message.direct and self._probe(message, server)
        if direct:
            self.mapped[(message.rank, True)] = MappedExports(DeviceOpener(memops(), self.device), message.rank)
        return P.Attached(req=message.req, events=events, pid=os.getpid(), started=start_time(os.getpid()) or 0,
                          direct=direct)

    def _probe(self, message: P.AttachDevice, server: int) -> bool:
        """Whether we can map the worker's GPU memory: its probe allocation holds its token where it said."""
        handle, size, offset = message.probe
        if memops() is None or not handle or not 0 <= offset <= size - TOKEN_BYTES:
            return False
        probe = MappedExports(DeviceOpener(memops(), self.device), message.rank)
        try:
            probe.introduce(0, handle, size)
            found = bytes(probe.view(0, offset, TOKEN_BYTES, torch.uint8).cpu().numpy())
        except ConfigError as exc:
            log.info("server %d: cannot map the GPU memory of worker %d (%s); its blocks go through its "
                     "device lane", server, message.rank, exc)
            return False
        finally:
            probe.close()
        return found == message.token

    def direct_views(self, request: P.BlockRequest, lane: Optional[Slots], state: BlockState
                     ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """The worker's exports that ``request`` names or lets go, then the views of its block's
        gradients and destination in the worker's memory that it names (None, None: none named)."""
        if not (request.direct or request.exports or request.gone):
            return None, None
        mapped = None if lane is None else self.mapped.get((request.rank, lane.on_device))
        if mapped is None:
            raise P.Rejected(P.BAD_REQUEST, f"worker {request.rank} named regions of its memory, but did not "
                                            f"offer its {'GPU' if lane is not None and lane.on_device else 'host'} "
                                            "memory with its lane")
        if request.gone:
            mapped.forget(request.gone)
        # every request names its exports, for a restarted server; the worker introduced them (map_exports)
        refused, why = self._introduce(mapped, request.exports)
        if refused:  # the worker sends what lies there through its lane from now on
            raise P.Rejected(P.UNMAPPED, f"{type(request).__name__} of {state.describe()}: server cannot map "
                                         f"{why}; it goes through the lane from the next exchange")
        try:
            if not request.direct:
                return None, None
            if not isinstance(request, P.PushPull) or len(request.direct) not in (2, 4) or request.segs is not None \
                    or request.absent or (request.shared and len(request.direct) == 4):
                raise ConfigError("regions of worker memory are for a PushPull of a whole block only")
            numel, dtype = state.flat.numel(), state.flat.dtype
            source, destination = (mapped.view(request.direct[i], request.direct[i + 1], numel, dtype)
                                   if i < len(request.direct) else None for i in (0, 2))
        except ConfigError as exc:
            raise P.Rejected(P.BAD_REQUEST, f"{type(request).__name__} of {state.describe()}: {exc}") from None
        self.direct_requests += 1
        return source, destination

    def map_exports(self, message: P.MapExports, server: int) -> P.ExportsMapped:
        """Map the exports a worker introduces before naming them; those we cannot map it sends
        through its lane."""
        mapped = self.mapped.get((message.rank, message.device))
        if mapped is None:
            raise P.Rejected(P.BAD_REQUEST, f"worker {message.rank} introduced exports of its "
                                            f"{'GPU' if message.device else 'host'} memory, which server {server} "
                                            "does not map: it did not offer them with its lane")
        mapped.forget(message.gone)
        refused, why = self._introduce(mapped, message.exports)
        if refused:
            log.info("server %d: cannot map %s; what lies there goes through the lane", server, why)
        return P.ExportsMapped(req=message.req, refused=refused, reason=why)

    def _introduce(self, mapped: MappedExports, exports: list[tuple[int, bytes, int]]) -> tuple[list[int], str]:
        """Open the exports not open yet: the ids of those we cannot open, and why the first could not."""
        refused, why = [], ""
        for export_id, handle, size in exports:
            if export_id in mapped:
                continue
            try:
                mapped.introduce(export_id, handle, size)
                self.exports_opened += 1
            except ConfigError as exc:
                refused.append(export_id)
                why = why or str(exc)
        self.exports_refused += len(refused)
        return refused, why

    def lane_for(self, request: P.BlockRequest, more_frames: bool, server: int) -> Optional[Slots]:
        """The lane a request came through, or None for a socket request."""
        if not request.shm and not request.ipc:
            return None
        kind, lanes = ("device lane", self.device_lanes) if request.ipc else ("shared-memory lane", self.lanes)
        lane = lanes.get(request.rank)
        if lane is None or isinstance(request, P.Init):
            raise P.Rejected(P.BAD_REQUEST, f"{type(request).__name__} through a {kind}, but worker "
                                            f"{request.rank} has none attached to server {server}")
        if more_frames:
            raise P.Rejected(P.PROTOCOL, "a lane request carries no frames")
        if request.ipc:
            self.ipc_requests += 1
        else:
            self.requests += 1
        return lane

    def row_lane(self, request: P.RowRequest, more_frames: bool, server: int) -> Optional[Lane]:
        """The lane a row request came through (its ids, and a push's gradients, in a row area), or None."""
        if not request.shm:
            return None
        lane = self.lanes.get(request.rank)
        if lane is None or not lane.row_bytes or isinstance(request, P.InitRows):
            raise P.Rejected(P.BAD_REQUEST, f"{type(request).__name__} through a shared-memory lane, but worker "
                                            f"{request.rank} has no lane with row areas attached to server {server}")
        if more_frames:
            raise P.Rejected(P.PROTOCOL, "a lane request carries no frames")
        self.requests += 1
        return lane

    def answer_rows(self, pending, shapes: list[tuple[int, int]], write_rows: Callable[[list[torch.Tensor]], None],
                    version: int) -> None:
        """Answer a pull of rows through its lane: ``write_rows`` fills the pull slot of its row area
        (a tensor of each of ``shapes``, one per table asked), then the bare header goes out."""
        lane = pending.lane
        if lane is not self.lanes.get(pending.rank):
            error = P.Error(kind=P.PEER_LOST, message=f"worker {pending.rank} has no lane any more", req=pending.req)
            self.io.answer(pending.peer, [P.encode(error)])
            return
        cursor = lane.row_cursor(ROW_PULLS, pull_slot=True)
        write_rows([cursor.take(count * dim * 4, torch.float32).view(count, dim) for count, dim in shapes])
        self.io.answer(pending.peer, [P.encode(P.RowValues(req=pending.req, version=version, shm=True))])

    def pushed(self, state: BlockState, segs: list[int], lane: Slots, held: bool, rank: int,
               source: Optional[torch.Tensor] = None) -> Pushed:
        """A lane push's gradients: views of the worker's push slot (host shards), or device copies
        of it (GPU shards); of ``source`` instead, where the request named where they lie in the
        worker's memory. ``held``: the worker leaves them alone until we answer. A device lane's
        push may come before the worker's gradients are there: we wait for it here."""
        if lane.on_device:
            _wait_pushed(lane, state, rank)
        if source is not None:
            slot, views = source, self.mapped[(rank, lane.on_device)].split(source, state)
        else:
            slot = _slot(lane, False, state)
            views = lane.views(False, state.block.block_id, (slot, state.block), lambda: state.split(slot))
        pushed = self.io.from_host(state, segs, slot, held=held, views=views)
        pushed.held = held
        return pushed

    def answer(self, state: BlockState, pending: Pending, values: P.Values) -> None:
        lane = pending.lane
        if lane is not self.lanes.get(pending.rank) and lane is not self.device_lanes.get(pending.rank):
            # the worker rejoined and its lane went with the old process
            error = P.Error(kind=P.PEER_LOST, message=f"worker {pending.rank} has no lane any more", req=pending.req)
            self.io.answer(pending.peer, [P.encode(error)])
            return
        if values.shared:  # the worker copies them out of our shared values: nothing to write
            self.shared_answers += 1
            self.io.answer(pending.peer, [P.encode(values)])
            return
        slot = _slot(lane, True, state) if pending.into is None else pending.into
        if lane.on_device:  # the worker waits for our flag or event, not for our answer, before it reads
            self.io.values_into(state, pending.segs, slot, done=lane.written[state.block.block_id])
            if pending.flag:
                lane.write_flag(self.io.stream, state.block.block_id, pending.flag)
            self.io.answer(pending.peer, [P.encode(values)])
            return
        self.io.answer(pending.peer, [P.encode(values)], after=self.io.values_into(state, pending.segs, slot))

    def refused(self, message: P.Message, came_through: Optional[DeviceLane] = None) -> None:
        """A request of a worker's own connection that named a flag is refused: write the flag
        anyway, so that the worker's copy queued behind it goes on (the refusal tells the worker
        its values did not come). Only into the lane it came through (``came_through``, where it
        is known), while that is still the worker's: a rejoined rank's new lane has numbers of its own."""
        if not (isinstance(message, P.BlockRequest) and message.flag and message.ipc):
            return
        lane = self.device_lanes.get(message.rank)
        if lane is not None and came_through in (None, lane) and message.block in lane.offsets:
            lane.write_flag(self.io.stream, message.block, message.flag)

    def refused_pending(self, pending: Pending) -> None:
        """``refused`` for a request already waiting for its values."""
        if getattr(pending, "flag", 0) and pending.lane is self.device_lanes.get(pending.rank):
            pending.lane.write_flag(self.io.stream, pending.block, pending.flag)

    def attached(self, message: P.Attach, store: DenseStore, shares_values: bool, server: int) -> P.Attached:
        """The answer to a lane: with our shared values where the workers of this host may read
        them (a sync server in host memory, on a CPU whose stores are seen in order)."""
        direct = (message.rank, False) in self.mapped
        if not shares_values or self.device.type != "cpu" or not store.blocks or not ordered_stores():
            return P.Attached(req=message.req, direct=direct)
        try:
            shared = store.share(values_name(server))
        except OSError as exc:
            log.warning("server %d: no shared values (%s); answers go through each worker's lane", server, exc)
            return P.Attached(req=message.req, direct=direct)
        return P.Attached(req=message.req, values=str(shared.path), token=shared.token, direct=direct)

    def counters(self) -> dict:
        """The lanes' part of ``Worker.server_stats()``."""
        return {"lanes": sorted(self.lanes), "lane_requests": self.requests, "device_lanes": sorted(self.device_lanes),
                "ipc_requests": self.ipc_requests, "shared_answers": self.shared_answers,
                "direct_requests": self.direct_requests, "exports_opened": self.exports_opened,
                "mapped_exports": sum(len(mapped) for mapped in self.mapped.values()),
                "exports_refused": self.exports_refused}

    def forget(self, workers: Iterable[int]) -> None:
        """Unmap the lanes of workers that closed or died: their memory goes back to the system
        once nothing reads it (a sync step they pushed to keeps its views of their slots until it
        is applied; uploads out of them to a GPU finish first)."""
        workers = [rank for rank in workers if rank in self.lanes or rank in self.device_lanes]
        if workers and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for rank in workers:
            for lanes in (self.lanes, self.device_lanes):
                lane = lanes.pop(rank, None)
                if lane is not None:
                    lane.close()
            for on_device in (False, True):
                self._close_mapped(rank, on_device)

    def _close_mapped(self, rank: int, on_device: bool) -> None:
        mapped = self.mapped.pop((rank, on_device), None)
        if mapped is not None:
            mapped.close()

    def close(self) -> None:
        for lane in [*self.lanes.values(), *self.device_lanes.values(), *self.mapped.values()]:
            lane.close()
        self.lanes.clear()
        self.device_lanes.clear()
        self.mapped.clear()


def _replace(lanes: dict, rank: int, lane: Slots) -> None:
    old = lanes.pop(rank, None)
    if old is not None:
        old.close()
    lanes[rank] = lane


def _wait_pushed(lane: DeviceLane, state: BlockState, rank: int) -> None:
    """Wait until worker ``rank``'s copy of its gradients into the push slot of ``state``'s block
    is done; ``Rejected`` if it died or the copy never ended."""
    error = lane.wait_pushed(state.block.block_id, rank)
    if error is not None:
        kind = P.TIMEOUT if isinstance(error, PSTimeoutError) else P.PEER_LOST
        raise P.Rejected(kind, f"push to {state.describe()}: {error}")


def _slot(lane: Slots, pull: bool, state: BlockState) -> torch.Tensor:
    """A block's pull (or push) slot in a lane, as a flat tensor of the block's dtype."""
    return lane.piece(pull, state.block.block_id, 0, state.block.nbytes, state.flat.dtype)


__all__ = ["ServerLanes"]
