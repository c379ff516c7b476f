"""The worker's end of the lanes: shared memory (``datapath/lane.py``) and CUDA IPC (``datapath/cuda_ipc.py``).

After ``register`` the worker offers every server a lane; the servers of its own host map it. A
worker whose tensors are on a GPU then offers the servers that took its lane a device lane, which
GPU servers map by CUDA IPC; their blocks go through it, the others' through the lane. A request
that goes through either reserves its block's slots, writes its gradients into the push slot,
sends only the header, and once answered copies the values out of the pull slot (straight onto the
GPU for a GPU destination) and frees the slots. A sync server in host memory offers its values in
shared memory with its answer to the lane (``datapath/values.py``): answers for host destinations
then leave the values there, and the worker copies them straight out of the server's memory.
"""

from __future__ import annotations

import functools
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import msgspec
import torch

from .. import protocol as P
from ..buffers import host_copy
from ..datapath.cuda_ipc import DeviceLane, FlagWatch
from ..datapath.lane import Lane, Slots, lane_name, remove_stale_lane_files
from ..datapath.memops import memops
from ..datapath.values import SharedValues
from ..errors import PSError
from ..sharding import Block, Segment, ShardMap
from .direct import DirectExchange
from .requests import Client, Future, Request

log = logging.getLogger("psframework.worker")

MAP_TIMEOUT = 30.0  # seconds a DistributedOptimizer waits at its start for the servers to map its buffers


@dataclass
class LaneCopy:
    """Where one segment of a lane reply goes: a host tensor, or a device tensor (copied on ``stream``)."""
    target: torch.Tensor
    block: Block
    seg: Segment
    stream: Optional["torch.cuda.Stream"]
    direct: bool = False  # the server writes the values into ``target`` itself: nothing to copy


def values_piece(values: SharedValues, block: Block, seg: Segment, dtype: torch.dtype) -> torch.Tensor:
    """Where one segment lies in a server's shared values of its block, as a typed tensor."""
    size = dtype.itemsize
    return values.piece(block.block_id, seg.block_offset * size, seg.numel * size, dtype)


def slot_piece(lane: Slots, pull: bool, block: Block, seg: Segment, dtype: torch.dtype) -> torch.Tensor:
    """Where one segment lies in a lane's pull (or push) slot of its block, as a typed tensor."""
    size = dtype.itemsize
    return lane.piece(pull, block.block_id, seg.block_offset * size, seg.numel * size, dtype)


def map_exports(client: Client, rank: int, server: int, on_device: bool, exports: list[tuple[int, bytes, int]],
                gone: list[int], answered: Callable[..., None]) -> Future:
    """Introduce exports of worker ``rank``'s memory to ``server`` (``MapExports``, with the ids
    ``gone`` since) without waiting: ``answered`` gets the ids it cannot map once it answers, or
    None if no answer comes, with ``accepted=False`` if it refused the message (``DirectExchange``)."""
    def on_answer(request: Request, reply: Optional[P.Message], ok: bool) -> None:
        if isinstance(reply, P.ExportsMapped):
            answered(list(reply.refused))
            return
        if isinstance(reply, P.Error):
            log.warning("worker %d: server %d refused the exports we introduced (%s); what we send it in %s "
                        "memory goes through the lanes", rank, server, reply.message, "GPU" if on_device else "host")
        answered(None, accepted=not isinstance(reply, P.Error))

    req = client.next_id()
    request = Request(Future(client), server, on_answer=on_answer, frames=[
        P.encode(P.MapExports(req=req, rank=rank, device=on_device, exports=exports, gone=gone))])
    client.submit(request, req)
    return request.future


class WorkerLanes:
    def __init__(self, client: Client, rank: int, shard_map: ShardMap, sync_copies: Callable[[], None],
                 cuda_ipc: bool = True, row_bytes: int = 0, direct: tuple[bool, bool] = (True, False)):
        self.client, self.rank, self.shard_map, self._cuda_ipc = client, rank, shard_map, cuda_ipc
        # blocks exchanged where our tensors lie
        self.direct = DirectExchange(rank, *direct, introduce=functools.partial(map_exports, client, rank))
        self.row_bytes = row_bytes  # of each row area of a lane (the job has tables), else 0
        self._sync_copies = sync_copies  # waits until no copy into a push area is in flight
        self.flag_watch: Optional[FlagWatch] = None  # made with the first device lane, if the driver has flags
        self.lanes: dict[int, Lane] = {}  # by server rank
        self.device_lanes: dict[int, DeviceLane] = {}  # by server rank
        self.values: dict[int, SharedValues] = {}  # the servers' shared values, by server rank
        # answers through device lanes whose values are copied out once their exchange is answered
        self._deferred: dict[Future, list[tuple[DeviceLane, list[LaneCopy], Block, int]]] = {}

    def check_device_work(self) -> None:
        """Raise the error of a server's device work that never came (``FlagWatch``), if there is one."""
        if self.flag_watch is not None:
            self.flag_watch.check()

    def _blocks(self, server: int) -> list[tuple[int, int]]:
        return [(b.block_id, b.nbytes) for b in self.shard_map.blocks_of_server(server)]

    def attach_all(self, servers: Iterable[int], device: Optional[torch.device]) -> None:
        """Offer each server a lane; those on this host map it, the others refuse. ``device``: the
        GPU the worker's tensors are on, whose copies should see the lane as pinned memory."""
        for stale in remove_stale_lane_files():
            log.info("removed %s, a lane file a dead process left behind", stale)
        offers = []
        for server in servers:
            blocks = self._blocks(server)
            if not blocks and not self.row_bytes:
                continue
            try:
                lane = Lane.create(lane_name(self.rank, server), blocks, self.row_bytes)
            except OSError as exc:
                log.warning("worker %d: no shared-memory lanes (%s); using the sockets only", self.rank, exc)
                break
            offers.append((server, lane, self.request_attach(server, lane)))
        for server, lane, request in offers:
            try:
                request.future.wait(timeout=30)
            except PSError as exc:
                log.debug("worker %d: server %d takes no lane: %s", self.rank, server, exc)
                lane.close()
                continue
            lane.mapped()  # both have it mapped: the descriptor the server opened it by can go
            self.lanes[server] = lane
            self._map_values(server, request.reply)
            self.direct.answered(server, False, getattr(request.reply, "direct", False))
            if device is not None:
                lane.pin(device)
        if offers:
            log.info("worker %d: shared-memory lanes to servers %s", self.rank, sorted(self.lanes))
        if device is not None and device.type == "cuda" and self._cuda_ipc and self.lanes:
            self._attach_devices(device)

    def _attach_devices(self, device: torch.device) -> None:
        """Offer a device lane to each server that took our lane; GPU servers map it by CUDA IPC."""
        offers = []
        for server in sorted(s for s in self.lanes if self._blocks(s)):
            try:
                lane = DeviceLane.create(device, self._blocks(server))
            except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
                log.warning("worker %d: no device lanes (%s); using the shared-memory lanes", self.rank, exc)
                break
            offers.append((server, lane, self.request_attach(server, lane)))
        refused = []
        for server, lane, request in offers:
            try:
                request.future.wait(timeout=30)
                lane.open_events(request.reply, server)
            except (PSError, RuntimeError, OSError) as exc:
                refused.append(f"server {server}: {exc}")
                lane.close()
                continue
            self.device_lanes[server] = lane
            self.direct.answered(server, True, request.reply.direct)
        if self.device_lanes and memops() is not None:
            self.flag_watch = FlagWatch(device, lambda: self.client.membership.rollback[0])
        if self.device_lanes:
            log.info("worker %d: device lanes (CUDA IPC) to servers %s", self.rank, sorted(self.device_lanes))
        if refused:
            log.info("worker %d: no device lane, the shared-memory lane instead, for %s", self.rank,
                     "; ".join(refused))

    def request_attach(self, server: int, lane: Slots) -> Request:
        req = self.client.next_id()
        if isinstance(lane, DeviceLane):
            probe = self.direct.probe(lane.memory)
            attach = lane.export(self.rank, req)
            if probe is not None:
                attach = msgspec.structs.replace(attach, direct=True, probe=probe)
        else:
            attach = P.Attach(req=req, rank=self.rank, path=str(lane.path), token=lane.token,
                              row_bytes=lane.row_bytes, direct=self.direct.enabled)
        request = Request(Future(self.client), server, frames=[P.encode(attach)])
        self.client.submit(request, req)
        return request

    def _map_values(self, server: int, reply: Optional[P.Message]) -> None:
        """Map the server's shared values, if its answer to our lane offered them."""
        old = self.values.pop(server, None)
        if old is not None:
            old.close()
        if not isinstance(reply, P.Attached) or not reply.values:
            return
        try:
            self.values[server] = SharedValues.attach(reply.values, reply.token, self._blocks(server))
        except (OSError, PSError, RuntimeError) as exc:
            log.info("worker %d: cannot map the shared values of server %d (%s); its answers come through "
                     "the lane", self.rank, server, exc)

    def reads_shared(self, server: int, copies: list) -> bool:
        """Whether an answer of ``server`` may leave the values in its shared values: we mapped them,
        and every copy goes to host memory."""
        return server in self.values and all(copy.stream is None for copy in copies)

    def renew(self, server: int) -> None:
        """The new process of a restarted server gets fresh lanes with the old ones' push areas
        (requests in flight still have their gradients there)."""
        if server not in self.lanes:
            return
        self._sync_copies()  # copies into the old push areas have landed
        old = self.lanes.pop(server)
        lane = Lane.create(lane_name(self.rank, server), self._blocks(server), self.row_bytes)
        lane.copy_push_area(old)
        if old.pinned:
            lane.pin()
        old.close()
        self.lanes[server] = lane
        self._map_values(server, None)  # the old process's; requests resent through the lane ask no longer
        request = self.request_attach(server, lane)
        request.future.on_complete(lambda: self._renewed(server, lane, request))
        old_device = self.device_lanes.pop(server, None)
        if old_device is not None:  # offered after the lane, so the server maps it after the lane
            device_lane = DeviceLane.create(old_device.memory.device, self._blocks(server))
            device_lane.copy_push_area(old_device)
            if self.flag_watch is not None:
                self.flag_watch.let_go(old_device, server)
            old_device.close()
            self.device_lanes[server] = device_lane
            offer = self.request_attach(server, device_lane)
            offer.future.on_complete(lambda: self._open_renewed(server, device_lane, offer))
            # nothing goes through the new lane before both sides opened the other's events: an event
            # recorded before the other process opened it is not seen there (RESULTS_GPU.md, fourth round)
            if not self.client.await_reply(offer, timeout=30):
                log.warning("worker %d: the restarted server %d did not answer our device lane in 30 s; new "
                            "requests go through the shared-memory lane", self.rank, server)

    def _open_renewed(self, server: int, lane: DeviceLane, offer: Request) -> None:
        """A restarted server mapped our new device lane: open its events."""
        try:
            lane.open_events(offer.reply, server)
            self.direct.answered(server, True, offer.reply.direct)
        except (PSError, RuntimeError, OSError) as exc:  # its answers then fail, each with the reason
            log.warning("worker %d: cannot open the events of the restarted server %d's device lane: %s",
                        self.rank, server, exc)

    def _renewed(self, server: int, lane: Lane, request: Request) -> None:
        lane.mapped()
        self._map_values(server, request.reply)
        self.direct.answered(server, False, getattr(request.reply, "direct", False))

    def reserve_rows(self, server: int, area: int) -> Optional[Lane]:
        """The lane to ``server`` for a row request, if it has row areas and ``area`` is free."""
        lane = self.lanes.get(server)
        return lane if lane is not None and lane.row_bytes and lane.reserve(area) else None

    def release_rows(self, server: int, area: int) -> None:
        """A row request on ``area`` is answered (or failed): free it (in the lane to ``server`` now:
        a restarted server's new lane took over the request's reservation)."""
        lane = self.lanes.get(server)
        if lane is not None:
            lane.release(area)

    def flag_for(self, lane: Slots, block: Block, copies: list[LaneCopy]) -> int:
        """The number the server is to write into ``block``'s flag in ``lane`` for a device-ordered
        exchange (``DeviceLane.wait_flag``), or 0: not a device lane, no flags in this driver, or
        values that go to host memory."""
        if not lane.on_device or self.flag_watch is None or not copies or any(c.stream is None for c in copies):
            return 0
        return lane.next_flag(block.block_id)

    def reserve(self, block: Block) -> Optional[Slots]:
        """The lane for a request on ``block`` (the device lane, if its server has one), if its
        server has one and the block's slots are free."""
        lane = self.device_lanes.get(block.server)
        if lane is None or not lane.ready:  # a restarted server's, whose events are not open (renew)
            lane = self.lanes.get(block.server)
        return lane if lane is not None and lane.reserve(block.block_id) else None

    def _holders(self, lane: Slots, server: int) -> tuple[Slots, ...]:
        """``lane``, and the lane to ``server`` that replaced it, if one did: a restarted server's
        new lane took the old one's reservations over (``renew``)."""
        current = (self.device_lanes if lane.on_device else self.lanes).get(server)
        return (lane,) if current is None or current is lane else (lane, current)

    def release_unsent(self, lane: Slots, block: Block) -> None:
        """Free the slots a request reserved in ``lane`` and never sent, wherever they are held now."""
        for holder in self._holders(lane, block.server):
            holder.release(block.block_id)

    def answered(self, lane: Slots, copies: list[LaneCopy], block: Block, flag: int, request: Request,
                 reply: P.Message, ok: bool) -> Optional[PSError]:
        """A lane request's answer is in: copy its values out of the pull slot, or out of the
        server's shared values (if it carries values), and free the block's slots. ``flag``: the
        number the request named (``flag_for``)."""
        # the request's lane, or the one that replaced it for a restarted server: the request was resent
        # through that one, which took over its reservation (renew)
        lane = (self.device_lanes if lane.on_device else self.lanes).get(block.server)
        if lane is None:
            return None  # closed
        if ok and isinstance(reply, P.Values) and reply.shared:
            lane.release(block.block_id)  # the pull slot was not used, and the push slot is read
            return self._read_shared(copies, block)
        if isinstance(reply, P.Values) and lane.on_device and ok:
            self._defer(request.future, lane, copies, block, flag)
            return None
        if flag and lane.on_device and not isinstance(reply, P.Values):
            # refused: no flag comes from the server, and a copy queued behind it must go on
            self.flag_watch.release_now(lane, {block.block_id: flag})
        if isinstance(reply, P.Values) and lane.on_device:
            # values nobody wants: the server's step may still read the push slot, so it is freed
            # only once the server's work is done
            lane.wait_written(block.block_id, self.client.membership.check, block.server)
            lane.release(block.block_id, request.future.prequeued.get(block.block_id))
            return None
        if lane.on_device:  # refused, maybe before the server read the slot: our copy into it must land
            lane.pushed_landed(block.block_id)
        copied = _copy_out(lane, [(copy, block) for copy in copies] if ok and isinstance(reply, P.Values) else [])
        lane.release(block.block_id, copied or request.future.prequeued.get(block.block_id))
        return None

    def copy_after_flags(self, future: Future, flagged: list[tuple[DeviceLane, list[LaneCopy], Block, int]]) -> None:
        """Queue the copies of these requests' values out of their device lanes' pull slots now,
        before their answers, each stream first waiting for the servers' flags; their events go to
        ``future.prequeued``, and the answers only free the slots (``_copy_deferred``)."""
        for lane, server, pieces, flags in _by_lane(flagged).values():
            with self.client.tracer.span("queued the copies behind the servers' flags", "answer", blocks=len(flags)):
                copied = _copy_out(lane, pieces, flags)
            self.flag_watch.watch(lane, server, flags, copied, answered=False)
            future.prequeued.update((block_id, copied) for block_id in flags)

    def _defer(self, future: Future, lane: DeviceLane, copies: list[LaneCopy], block: Block, flag: int) -> None:
        """The server answered once it had queued its copy into the pull slot. The copy out of it,
        unless ``copy_after_flags`` queued it behind the server's flag already, waits for the
        server's event: it is made with those of the exchange's other blocks of device lanes once
        every answer is in, in one burst of our kernels. Copies of ours between the server's kernels
        on a shared GPU cost a switch between the two processes each."""
        deferred = self._deferred.get(future)
        if deferred is None:
            deferred = self._deferred[future] = []
            future.before_done(lambda: self._copy_deferred(future))
        deferred.append((lane, copies, block, flag))

    def _copy_deferred(self, future: Future) -> Optional[PSError]:
        """Copy the values of the exchange's device-lane blocks out of their pull slots, once the
        servers' events say they are there, and free their slots; blocks whose copies
        ``copy_after_flags`` queued behind the servers' flags only have their slots freed. Values
        nobody wants are not copied, and their slots are freed only once the server's work is done
        (until then its step may still read the push slot)."""
        deferred = self._deferred.pop(future, [])
        queued = [entry for entry in deferred if entry[2].block_id in future.prequeued]
        rest = [entry for entry in deferred if entry[2].block_id not in future.prequeued]
        error = _wait_written(self.client, rest)
        for lane, server, pieces, flags in _by_lane(rest).values():
            copied = [] if error is not None or future.discards else _copy_out(lane, pieces)
            self._release(lane, server, flags, copied)
        for lane, _, block, _ in queued:
            self.flag_watch.answered(future.prequeued[block.block_id])
            self._release(lane, block.server, [block.block_id], future.prequeued[block.block_id])
        return error

    def _release(self, lane: DeviceLane, server: int, block_ids: Iterable[int], copied: list) -> None:
        for block_id, holder in itertools.product(block_ids, self._holders(lane, server)):
            holder.release(block_id, copied)

    def _read_shared(self, copies: list[LaneCopy], block: Block) -> Optional[PSError]:
        values = self.values.get(block.server)
        if values is None:
            return PSError(f"worker {self.rank}: server {block.server} answered through its shared values, "
                           "which this worker has not mapped")

        def copy_all() -> None:
            for copy in copies:
                host_copy(copy.target, values_piece(values, copy.block, copy.seg, copy.target.dtype))
        try:
            values.read(block.block_id, copy_all)
        except PSError as exc:
            return exc
        return None

    def close(self) -> None:
        if self.flag_watch is not None:
            self.flag_watch.close()
            self.flag_watch = None
        for lane in [*self.lanes.values(), *self.device_lanes.values(), *self.values.values(), self.direct]:
            lane.close()
        self.lanes, self.device_lanes, self.values = {}, {}, {}


def _wait_written(client: Client, deferred: list) -> Optional[PSError]:
    """Wait on the host for the servers' events of these deferred blocks; the first error."""
    error = None
    if deferred:
        with client.tracer.span("waited for the servers' device work", "answer", blocks=len(deferred)):
            for lane, _, block, _ in deferred:
                error = error or lane.wait_written(block.block_id, client.membership.check, block.server)
    return error


def _by_lane(entries: list[tuple]) -> dict[int, tuple[DeviceLane, int, list, dict[int, int]]]:
    """(lane, copies, block, flag) entries grouped by lane: the lane, its server, the (copy, block)
    pieces and the flags by block id."""
    by_lane: dict[int, tuple[DeviceLane, int, list, dict[int, int]]] = {}
    for lane, copies, block, flag in entries:
        _, _, pieces, flags = by_lane.setdefault(id(lane), (lane, block.server, [], {}))
        pieces.extend((copy, block) for copy in copies)
        flags[block.block_id] = flag
    return by_lane


def _copy_out(lane: Slots, pieces: list[tuple[LaneCopy, Block]], flags: Optional[dict[int, int]] = None) -> list:
    """Copy values out of the lane's pull slots: host targets at once, device targets with one call
    per stream (a Python copy_ each cost ~20 us, which added up to a millisecond for a block of
    many small tensors at the end of a step), each stream first waiting for the flags (block id:
    number, 0 for none) of the blocks it copies; the events of the device copies."""
    to_devices: dict["torch.cuda.Stream", tuple[list, list, set]] = {}
    for copy, block in pieces:
        if copy.stream is None:
            if not copy.direct:
                _copy_to_host(copy.target, slot_piece(lane, True, block, copy.seg, copy.target.dtype))
            continue
        targets, sources, blocks = to_devices.setdefault(copy.stream, ([], [], set()))
        blocks.add(block.block_id)  # a direct block's values are in place once its flag or event says so
        if not copy.direct:
            targets.append(copy.target)
            sources.append(slot_piece(lane, True, block, copy.seg, copy.target.dtype))
    copied = []
    for stream, (targets, sources, blocks) in to_devices.items():
        for block_id in sorted(blocks):
            if flags and flags.get(block_id):
                lane.wait_flag(stream, block_id, flags[block_id])
        if targets:
            with torch.cuda.stream(stream):
                torch._foreach_copy_(targets, sources, non_blocking=True)
        copied.append(torch.cuda.Event())
        copied[-1].record(stream)
    return copied


def _copy_to_host(target: torch.Tensor, source: torch.Tensor) -> None:
    if source.is_cuda:
        target.copy_(source)  # a host tensor pulled through a device lane: waits for the copy
    else:
        host_copy(target, source)


__all__ = ["LaneCopy", "WorkerLanes", "slot_piece", "values_piece"]
