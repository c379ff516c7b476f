"""One push, pull or push_pull, sent block by block as its sources are added.

A block goes out once every source in it was added and, for a source on a GPU, its copy into
the worker's pinned buffer for that key has landed. Sources in host memory go out zero-copy and
host destinations receive in place; destinations on a GPU receive into the worker's pinned
buffer for the key, and each block's values are copied on to the device as soon as they arrive.
A block whose server has a lane to this worker, with the block's slots free, goes through the lane
instead: sources are copied into its push slot (straight from the GPU, for a GPU tensor; device to
device for a device lane), only the header is sent once the copies have landed (through a device
lane, as soon as they are queued: the server waits for the event recorded after them), and the
values are copied out of its pull slot.

A tensor with a codec (``datapath/compression.py``) is encoded when it is added, on its device, for
the blocks that go over the socket; the payloads are its frames, and the header names their codecs.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter, deque
from typing import TYPE_CHECKING, Callable, Iterable, Optional

import torch

from .. import protocol as P
from ..buffers import byte_view, host_copy
from ..compress import Codec
from ..datapath.lane import Slots
from ..devices import Staging
from ..errors import ConfigError
from ..sharding import Block, Segment
from .direct import Regions
from .lanes import LaneCopy, slot_piece
from .plans import PackedBlock, Part, packed_names, whole_segment
from .requests import Future, Request

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker

log = logging.getLogger("psframework.worker")


def segment_of(flat: torch.Tensor, seg: Segment) -> torch.Tensor:
    """The elements of ``seg`` in a tensor's flat view; the view itself where the segment is the
    whole tensor (slicing costs more than a microsecond, for each tensor of each step)."""
    return flat if seg.numel == flat.numel() else flat[seg.offset:seg.offset + seg.numel]


def _mark_other_servers(worker: "Worker", step: int, pushed_to: dict[int, int]) -> None:
    """In sync mode, tell the servers a step pushes nothing to that it happened, so that a block
    they wait for in vain is reported, not waited for (``server/steps.py``)."""
    if step < 0 or worker.mode != "sync" or len(pushed_to) == worker.num_servers:
        return
    mark = [P.encode(P.Mark(rank=worker.rank, step=step))]
    for server in range(worker.num_servers):
        if server not in pushed_to:
            worker.client.send(server, mark)


def send_whole(exchange: "Exchange", sources: Optional[dict]) -> Future:
    """Add every source of an exchange made at once (push, pull, push_pull) and send all of it;
    if that fails half-way, the exchange is dropped (``Exchange.abandon``) and the error raised."""
    try:
        _add_packed(exchange)
        for name, tensor in (sources or {}).items():
            if name not in exchange.packed_names:
                exchange.add(name, tensor, checked=True)
        exchange.send_ready(wait=True)
    except BaseException:
        exchange.abandon()
        raise
    return exchange.future


def _codec_names(compression, op: type, parts: list[Part], payloads: dict, absent: set[str]
                 ) -> tuple[list[str], list[str]]:
    """The header's codecs of the pushed segments and of the pulled ones ([]: none compressed)."""
    codecs = [compression.push_codec(name).wire if (name, seg.offset) in payloads else ""
              for _, seg, name in parts if op is not P.Pull and name not in absent]
    pull = [getattr(compression.pull_codec(name), "wire", "") for _, _, name in parts] \
        if op in (P.Pull, P.PushPull) else []
    return (codecs if any(codecs) else []), (pull if any(pull) else [])


def _push_nothing(exchange: "Exchange") -> None:
    """A sync step dropped half-sent: push its unsent blocks without a gradient (socket requests
    with every segment absent), so that the step completes for every worker (what was sent counts,
    the rest counts as zero in the mean) and this worker's next step lines up with the others'."""
    worker = exchange.worker
    if exchange.step < 0 or worker.mode != "sync":
        return
    blocks = [block for block_id, (block, _) in exchange._blocks.items() if block_id not in exchange._sent]
    try:
        worker.membership.check()  # not while closing, nor with a node of the job dead
        worker.client.same_epoch(exchange.epoch)  # after a rollback the step is gone anyway
        for block in blocks:
            req = worker.client.next_id()
            header = P.Push(req=req, block=block.block_id, rank=worker.rank, dtype=block.dtype, step=exchange.step,
                            rollback=worker.client.rollback, absent=list(range(len(block.segments))))
            worker.client.submit(Request(exchange.future, block.server, frames=[P.encode(header)]), req)
    except Exception as exc:  # noqa: BLE001 -- dropping never raises: the step's own error is the one to see
        log.warning("worker %d: could not complete the dropped step %d on its servers: %s", worker.rank,
                    exchange.step, exc)


def _release_sources_when_landed(exchange: "Exchange") -> None:
    """Every block is sent: let the sources go, or, where copies of blocks sent before they landed
    may still read them, once the exchange is answered."""
    if exchange._landed:
        exchange.future.before_done(functools.partial(_release_sources, exchange))
    else:
        exchange._keep.clear()


def _release_sources(exchange: "Exchange") -> None:
    """The exchange is answered: the copies of blocks sent before they landed are done (the server
    waited for them, unless it refused first), and their sources may go back to the allocator."""
    for events in exchange._landed.values():
        for event in events:
            event.synchronize()
    exchange._landed.clear()
    exchange._keep.clear()


def _through_lane(exchange: "Exchange", lane: Slots, block: Block, parts: list[Part], landed: Iterable
                  ) -> tuple[list[LaneCopy], int]:
    """A lane request of ``block``: its host sources into the push slot, and the copies of its
    values out of the pull slot once answered, with the number of the flag the server is to write
    (``WorkerLanes.flag_for``; a push's copies are none, so it names none). Through a device lane,
    the push event is then recorded after the copies into the push slot, those from GPUs
    (``landed``) too: the server waits for it, not we for them (``_record_pushed``)."""
    regions = _direct_regions(exchange, lane, block, parts)
    packed = exchange._packed.get(block.block_id)
    if packed is not None:
        copies = _packed_through_lane(exchange, lane, block, packed, regions)
    elif regions is None:
        copies = [c for c in (_into_lane(exchange, lane, block, seg, name) for _, seg, name in parts) if c]
    else:  # the server reads the gradients where they lie, and writes the values there too if it maps them
        copies = [exchange._dests[name].from_lane(block, seg, direct=regions.writes)
                  for _, seg, name in parts] if exchange._dests else []
    if lane.on_device and exchange.op is not P.Pull:
        _record_pushed(exchange, lane, block, parts, landed, direct=exchange._direct.get(block.block_id))
    # only a device-ordered exchange waits on the GPU: wait() of any other returns once the values are there
    flag = exchange.worker.lanes.flag_for(lane, block, copies) if exchange._device_ordered else 0
    if flag:
        exchange._flagged.append((lane, copies, block, flag))
        if regions is not None and lane.on_device:
            _held_until_flag(exchange, block, copies)
    return copies, flag, regions


def _direct_answered(direct, regions: Regions, on_device: bool, answered, request, reply, ok: bool):
    """A direct request's answer: a server that could not map what it named refused it
    (``UNMAPPED``), and those exports go through the lanes from now on. After any failure the
    exports it told gone are told again (the server may not have read them; it ignores ids it
    does not know)."""
    if not ok or isinstance(reply, P.Error):
        direct.untake_gone(request.server, on_device, regions.gone)
    if isinstance(reply, P.Error) and reply.kind == P.UNMAPPED:
        direct.refused(on_device, regions.direct[0::2])
    return answered(request, reply, ok)


def _tell_gone_again(exchange: "Exchange") -> None:
    """A dropped exchange's GPU blocks placed for the direct exchange but never sent: the exports
    gone their requests were to tell are told by the next."""
    for block_id, (regions, *_) in exchange._direct.items():
        if block_id not in exchange._sent:
            exchange.worker.lanes.direct.untake_gone(exchange._blocks[block_id][0].server, True, regions.gone)


def _held_until_flag(exchange: "Exchange", block: Block, copies: list[LaneCopy]) -> None:
    """A flagged direct block's gradient and destination, which the server reads and writes on its
    GPU while no host of ours waits for it: once freed, the allocator gives their memory out again
    only after the work queued on the streams that wait for the server's flag."""
    sources = exchange._direct.get(block.block_id, (None, ()))[1]
    streams = {(copy.stream.device, copy.stream.cuda_stream): copy.stream for copy in copies if copy.stream is not None}
    # one record per allocation and stream: a block's many segments are views of a few allocations
    allocations = {tensor.untyped_storage().data_ptr(): tensor
                   for tensor in (*sources, *(copy.target for copy in copies)) if tensor.is_cuda}
    for stream in streams.values():
        for tensor in allocations.values():
            tensor.record_stream(stream)


def _packed_through_lane(exchange: "Exchange", lane: Slots, block: Block, packed: PackedBlock,
                         regions: Optional[Regions]) -> list[LaneCopy]:
    """``_into_lane`` of a packed block, all of it in one piece: host gradients into its push slot
    unless its server reads them where they lie (GPU ones were queued when added), and the one
    copy of its values out of the pull slot (none if its server writes them in place)."""
    whole = whole_segment(block)
    if regions is None and not packed.grads.is_cuda:
        slot = slot_piece(lane, False, block, whole, packed.grads.dtype)
        if lane.on_device:
            slot.copy_(packed.grads)  # host gradients through a device lane: waits for the copy
        else:
            host_copy(slot, packed.grads)
    stream = exchange.worker.staging.stream(packed.values.device, "pull") if packed.values.is_cuda else None
    return [LaneCopy(packed.values, block, whole, stream, regions is not None and regions.writes)]


def _packed_direct_on_device(exchange: "Exchange", block: Block, packed: PackedBlock,
                             after: Optional["torch.cuda.Event"] = None) -> bool:
    """``_direct_on_device`` of a packed block's GPU gradients: whether its server reads them where
    they lie (once ``after`` is done, or the work queued on the caller's stream, which staged them)."""
    direct = exchange.worker.lanes.direct
    if not exchange._lane_blocks[block.block_id].on_device or not direct.accepts(block.server, True):
        return False
    regions = direct.regions(block.server, True, [packed.grads], [packed.values])
    if regions is not None:
        exchange._direct[block.block_id] = (regions, [packed.grads], [after])
    return regions is not None


def _add_packed(exchange: "Exchange") -> None:
    """Hand over the gradients of the packed blocks (``PackedBlock``), a block at a time: a GPU
    block's server reads them where they lie, or they are copied into its push slot in one copy
    (host ones once the block is sent, as ``add``'s)."""
    for block_id, packed in exchange._packed.items():
        _add_one_packed(exchange, block_id, packed)
    _launch_copies(exchange)


def _add_one_packed(exchange: "Exchange", block_id: int, packed: PackedBlock,
                    after: Optional["torch.cuda.Event"] = None) -> None:
    block = exchange._blocks[block_id][0]
    exchange._sources.update(dict.fromkeys(packed.names))
    if packed.grads.is_cuda:
        exchange._from_device.update(packed.names)
        if not _packed_direct_on_device(exchange, block, packed, after):
            device = packed.grads.device
            stream = exchange.worker.staging.stream(device, "push")
            if after is not None:
                stream.wait_event(after)
            else:
                exchange._after_caller(stream, device, "push")
            _queue_copy(exchange, slot_piece(exchange._lane_blocks[block_id], False, block, whole_segment(block),
                                             packed.grads.dtype), packed.grads, block_id)
            exchange._keep.append(packed.grads)
    exchange._missing[block_id] = 0
    exchange._ready.append(block_id)


def add_packed_block(exchange: "Exchange", block_id: int, after: Optional["torch.cuda.Event"] = None) -> bool:
    """Hand over one packed block's gradients, the block whole (overlap: its last gradient is in,
    and all of them were staged into the block's region; ``after``: a GPU event they are ready
    after). False where the exchange sends that block tensor by tensor (it has no lane for it):
    the caller adds its tensors one by one."""
    packed = exchange._packed.get(block_id)
    if packed is None:
        return False
    if exchange._dropped or not exchange._missing[block_id]:
        raise ConfigError(f"{exchange.op.__name__}: block {block_id} was given twice, or to an exchange that was "
                          "dropped; start a new one")
    _add_one_packed(exchange, block_id, packed, after)
    _launch_copies(exchange)
    return True


def unpack_block(exchange: "Exchange", block_id: int, dests: dict) -> None:
    """A block the exchange was to send packed goes tensor by tensor after all (overlap: one of its
    gradients was not staged into its view, or never came): its tensors get their destinations in
    ``dests``, as the others got theirs, and are added one by one."""
    packed = exchange._packed.pop(block_id, None)
    if packed is None:
        return
    exchange.packed_names = packed_names(exchange._packed)
    exchange._dests.update({name: exchange._destination(name, dests[name], after_caller=False)
                            for name in packed.names})


def _into_lane(exchange: "Exchange", lane: Slots, block: Block, seg: Segment, name: str) -> Optional[LaneCopy]:
    """One segment of a lane request: its source into the push slot (a GPU source is there
    already), and the copy of its values out of the pull slot once the answer is in."""
    if exchange.op is not P.Pull and name not in exchange._from_device and name not in exchange._absent:
        source = segment_of(exchange._sources[name], seg)
        slot = slot_piece(lane, False, block, seg, source.dtype)
        if lane.on_device:
            slot.copy_(source)  # a host tensor pushed through a device lane: waits for the copy
        else:
            host_copy(slot, source)
    return exchange._dests[name].from_lane(block, seg) if exchange._dests else None


def _direct_regions(exchange: "Exchange", lane: Slots, block: Block, parts: list[Part]) -> Optional[Regions]:
    """Where ``block``'s gradients (and destination) lie, if its server is to read (and write) them
    there (``worker/direct.py``): a ``PushPull`` of the whole block, every gradient present. A GPU
    block was placed when its tensor was added (``_direct_on_device``), before any copy of it."""
    if lane.on_device:
        return exchange._direct.get(block.block_id, (None,))[0]
    direct = exchange.worker.lanes.direct
    packed = exchange._packed.get(block.block_id)
    if packed is not None:  # host gradients and values (GPU ones are refused here)
        return direct.regions(block.server, False, [packed.grads], [packed.values]) \
            if direct.accepts(block.server, False) else None
    if exchange.op is not P.PushPull or not direct.accepts(block.server, False) or len(parts) != len(block.segments) \
            or any(name in exchange._absent or exchange._sources.get(name) is None for _, _, name in parts):
        return None  # a GPU tensor's gradient through a host lane is in the push slot already
    sources = [segment_of(exchange._sources[name], seg) for _, seg, name in parts]
    dests = [exchange._dests[name].target_of(seg) for _, seg, name in parts] if exchange._dests else None
    return direct.regions(block.server, False, sources, dests)


def _direct_on_device(exchange: "Exchange", block: Block, seg: Segment, source: torch.Tensor, after) -> bool:
    """Whether a piece of a GPU tensor being added (``source``: its flat view) goes direct, or may:
    then nothing is copied into its push slot now. A piece of a block of several segments is
    gathered until the block is complete (``_settle_gathered``)."""
    lane = exchange._lane_blocks.get(block.block_id)
    parts = exchange._blocks[block.block_id][1]
    if lane is None or not lane.on_device or exchange.op is not P.PushPull or len(parts) != len(block.segments) \
            or not exchange.worker.lanes.direct.accepts(block.server, True):
        return False
    if len(block.segments) > 1:
        exchange._gathered.setdefault(block.block_id, []).append((seg, source, after))
        return True
    name = parts[0][2]
    regions = exchange.worker.lanes.direct.regions(block.server, True, [segment_of(source, seg)],
                                                   [exchange._dests[name].target_of(seg)] if exchange._dests else None)
    if regions is not None:  # the source stays ours until answered; the server reads it after ``after``
        exchange._direct[block.block_id] = (regions, [source], [after])
    return regions is not None


def _settle_gathered(exchange: "Exchange", block_id: int) -> None:
    """A block of several segments is complete: it goes direct if every piece was gathered and
    they lie one after another in memory the server maps (``DistributedOptimizer``'s staged gradients do,
    ``worker/flat.py``); else the gathered pieces are queued for their copies into its push slot
    (the copy stream waits for what made them since they were added)."""
    gathered = exchange._gathered.pop(block_id, None)
    if not gathered:
        return
    block, parts = exchange._blocks[block_id]
    if len(gathered) == len(block.segments):
        gathered.sort(key=lambda piece: piece[0].block_offset)
        sources = [segment_of(source, seg) for seg, source, _ in gathered]
        dests = [exchange._dests[name].target_of(seg) for _, seg, name in sorted(parts, key=lambda part: part[0])] \
            if exchange._dests else None
        regions = exchange.worker.lanes.direct.regions(block.server, True, sources, dests)
        if regions is not None:
            exchange._direct[block_id] = (regions, sources, [after for *_, after in gathered])
            return
    lane = exchange._lane_blocks[block_id]
    for seg, source, _ in gathered:
        _queue_copy(exchange, slot_piece(lane, False, block, seg, source.dtype), segment_of(source, seg), block_id)


def _queue_copy(exchange: "Exchange", target: torch.Tensor, source: torch.Tensor, block_id: int) -> None:
    """A copy from a GPU for ``_launch_copies``."""
    targets, sources, blocks = exchange._unlaunched.setdefault(source.device, ([], [], set()))
    targets.append(target)
    sources.append(source)
    blocks.add(block_id)


def _launch_copies(exchange: "Exchange") -> None:
    """Launch the copies from GPUs queued since the last launch (none for pieces that went direct),
    one call and one event per device: a copy per tensor cost a 100M-parameter model's step
    milliseconds of host time. The copy stream already waits for what ``add`` was told to."""
    for device, (targets, sources, blocks) in exchange._unlaunched.items():
        if not targets:
            continue
        stream = exchange.worker.staging.stream(device, "push")
        with torch.cuda.stream(stream):
            torch._foreach_copy_(targets, sources, non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(stream)
        for block_id in blocks:
            exchange._landed.setdefault(block_id, []).append(landed)
    exchange._unlaunched.clear()


def _record_pushed(exchange: "Exchange", lane: Slots, block: Block, parts: list[Part], landed: Iterable,
                   direct: Optional[tuple] = None) -> None:
    """Record ``block``'s push event after its copies from GPUs (``landed``) and, if it has host
    sources, after the caller's stream (a copy from pageable memory may return before its DMA is
    done). It is recorded on a stream of its own: the copy stream may already wait for gradients
    of later blocks that the backward pass has not made yet, and the server waits for this event."""
    device = lane.memory.device
    # a direct block's server reads the gradient where it lies, once what made it is done (``after``
    # of ``add``), and writes the destination after all queued so far, which may read it
    events = [*landed, *(event for event in (direct[2] if direct is not None else ()) if event is not None)]
    after_caller = direct is not None and (direct[0].writes or any(event is None for event in direct[2]))
    caller = torch.cuda.current_stream(device) if after_caller or any(
        name not in exchange._from_device and name not in exchange._absent for _, _, name in parts) else None
    if direct is not None and all(event.query() for event in events) and (caller is None or caller.query()):
        # all that is done already: the event's last record, done too, lets the server go at once. A
        # record would be work in our CUDA context, which the GPU would switch to before the server's
        # kernels and back (about 160 us each way on an H100 without MPS; RESULTS_GPU.md)
        return
    stream = exchange.worker.staging.stream(device, "signal")
    for event in events:
        stream.wait_event(event)
    if caller is not None:
        stream.wait_stream(caller)
    lane.record_pushed(block.block_id, stream)


def _reserve_lanes(worker: "Worker", op: type, blocks: dict) -> dict[int, Slots]:
    """The lanes whose slots the exchange's blocks (``Exchange._blocks``) go through, by block id."""
    lanes = {}
    for block_id, (block, parts) in blocks.items():
        if not worker.compression.keeps_off_lane(op, [name for _, _, name in parts]):
            lane = worker.lanes.reserve(block)
            if lane is not None:
                lanes[block_id] = lane
    return lanes


def _queue_flagged(exchange: "Exchange") -> None:
    """Queue the copies of the flagged blocks' values out of their pull slots now, each behind a
    wait for its server's flag, and order the caller's streams after them: a ``device_ordered``
    exchange whose every block went so may be left to complete while the caller goes on."""
    flagged, exchange._flagged = exchange._flagged, []
    exchange.worker.lanes.copy_after_flags(exchange.future, flagged)
    exchange.future.order_streams()
    exchange.future.ordered_on_device = len(flagged) == len(exchange._blocks)


def _pull_stream(exchange: "Exchange", device: torch.device, after_caller: bool) -> "torch.cuda.Stream":
    """The stream that copies values onto ``device``, after the caller's work queued so far (which
    may read the destinations) unless ``after_caller`` is False; ``wait()`` orders the caller after it."""
    stream = exchange.worker.staging.stream(device, "pull")
    if after_caller:
        exchange._after_caller(stream, device, "pull")
    exchange.future.copies_on(device, stream)
    return stream


class Exchange:
    def __init__(self, worker: "Worker", op: type, names: list[str], dests: Optional[dict], *, step: int = -1,
                 after_caller: bool = True, epoch: Optional[int] = None, device_ordered: bool = False,
                 packed: Optional[dict[int, PackedBlock]] = None):
        self.worker = worker
        self.op = op
        self.step = step  # which of the worker's pushing steps this is (-1: not a push)
        self.future = Future(worker.client).unsealed()
        # a rollback while it is sent drops the rest of it
        self.epoch = worker.client.rollback if epoch is None else epoch
        self._blocks = worker.plans.layout(tuple(names))  # shared with other exchanges: read only
        self._missing = {block_id: len(parts) for block_id, (_, parts) in self._blocks.items()}
        self._sources: dict[str, Optional[torch.Tensor]] = {}  # flat host tensors (None: all in lanes)
        self._from_device: set[str] = set()  # sources copied from a GPU (already in their lane slots)
        self._absent: set[str] = set()  # keys pushed without a gradient
        self._staged: dict[str, Staging] = {}
        self._landed: dict[int, list] = {}  # block -> events of its copies from GPUs
        # copies from GPUs not launched yet, by device: targets, sources, and the blocks they fill
        self._unlaunched: dict[torch.device, tuple[list, list, set]] = {}
        self._keep: list[torch.Tensor] = []  # device tensors read by copies that may be in flight
        self._ready: deque[int] = deque()  # blocks whose sources are all added, oldest first
        # blocks not yet sent, by server
        self._unsent_to: dict[int, int] = dict(Counter(block.server for block, _ in self._blocks.values()))
        self._ordered: set[tuple[torch.device, str]] = set()  # copy streams already after the caller's
        self._lane_blocks: dict[int, Slots] = {}  # reserved for this exchange; freed once answered
        self._sent: set[int] = set()
        self._dropped = False
        self._payloads: dict[tuple[str, int], torch.Tensor] = {}  # encoded sources by (key, segment offset)
        self._device_ordered, self._flagged = device_ordered, []  # flagged: see _queue_flagged
        self._direct: dict[int, tuple] = {}  # GPU blocks placed for the direct exchange (_direct_on_device)
        self._gathered: dict[int, list] = {}  # pieces of GPU blocks of several segments that may go direct
        if op is P.PushPull:
            worker.lanes.direct.sweep()
        if op is not P.Init:
            self._lane_blocks = _reserve_lanes(worker, op, self._blocks)
        if op is P.Pull:
            self._ready.extend(self._blocks)
        # blocks that go as one piece each way (``_add_packed``): whole blocks of a push_pull with a lane
        self._packed = {block_id: region for block_id, region in (packed or {}).items()
                        if op is P.PushPull and block_id in self._lane_blocks
                        and len(self._blocks[block_id][1]) == len(self._blocks[block_id][0].segments)}
        self.packed_names = packed_names(self._packed)
        try:
            if dests is not None:
                worker.plans.drop_moved()
            self._dests = ({name: self._destination(name, dests[name], after_caller) for name in names
                            if name not in self.packed_names} if dests is not None else {})
            for device in {region.values.device for region in self._packed.values() if region.values.is_cuda}:
                _pull_stream(self, device, after_caller)
            _mark_other_servers(worker, step, self._unsent_to)
        except BaseException:
            self.abandon()  # frees the slots reserved above
            raise
        self._seal_if_sent()

    @property
    def sent_blocks(self) -> int:
        return len(self._sent)

    @property
    def all_sent(self) -> bool:
        return not any(self._unsent_to.values())

    def add(self, name: str, tensor: Optional[torch.Tensor], after: Optional["torch.cuda.Event"] = None,
            checked: bool = False) -> None:
        """Hand over the source tensor for ``name`` (None: no gradient this step). For a tensor on a
        GPU, its copy to the host waits for ``after`` (default: for the work queued so far on the
        caller's current stream). ``checked``: the caller checked ``tensor`` against its key."""
        if name in self._sources:
            raise ConfigError(f"{self.op.__name__}: {name!r} was given twice")
        if name in self.packed_names:
            raise ConfigError(f"{self.op.__name__}: {name!r} goes with its block, whole (add_packed_block); "
                              "unpack_block it to add its tensors one by one")
        if self._dropped:
            raise ConfigError(f"{self.op.__name__}: {name!r} was given to an exchange that was dropped; "
                              "start a new one")
        pieces = self.worker.shard_map.pieces_of(name)
        if tensor is None:
            self._absent.add(name)
            flat = None
        else:
            if not checked:
                self.worker.check_tensor(name, tensor, self.op.__name__)
            raw = self._encode(name, tensor, pieces, after)
            if tensor.device.type == "cpu":
                flat = tensor.detach().contiguous().reshape(-1)
            else:
                flat = self._copy_from_device(name, tensor, raw, after) if raw else None
                self._from_device.add(name)
        self._sources[name] = flat
        for block, _, _ in pieces:
            self._missing[block.block_id] -= 1
            if self._missing[block.block_id] == 0:
                self._ready.append(block.block_id)
                _settle_gathered(self, block.block_id)
                _launch_copies(self)

    def _encode(self, name: str, tensor: torch.Tensor, pieces: list, after) -> list:
        """Encode the pieces that go compressed over the socket (on the tensor's device, after
        ``after``); the pieces left to send as they are."""
        codec = self.worker.compression.push_codec(name) if self.op in (P.Push, P.PushPull) else None
        packed = [p for p in pieces if codec is not None and p[0].block_id not in self._lane_blocks]
        if not packed:
            return pieces
        segments = [seg for _, _, seg in packed]
        if tensor.device.type == "cpu":
            payloads = self.worker.compression.encode(name, tensor, segments)
        else:
            stream = self.worker.staging.stream(tensor.device, "push")
            if after is not None:
                stream.wait_event(after)
            else:
                self._after_caller(stream, tensor.device, "push")
            with torch.cuda.stream(stream):  # the payloads, a fraction of the tensor, come to the host
                payloads = [p.cpu() for p in self.worker.compression.encode(name, tensor, segments)]
        for seg, payload in zip(segments, payloads):
            self._payloads[(name, seg.offset)] = payload
        return [p for p in pieces if p not in packed]

    def _copy_from_device(self, name: str, tensor: torch.Tensor, pieces: list, after) -> Optional[torch.Tensor]:
        """Start the copies of a GPU tensor's blocks to the host: into their lane's push slot, or
        into the key's pinned staging buffer, which is returned (None if every block has a lane)."""
        staging, device = self.worker.staging, tensor.device
        flat = None
        if any(block.block_id not in self._lane_blocks for block, _, _ in pieces):
            buffer = staging.buffer("push", name, tensor)
            buffer.wait(self.worker.membership.check)  # earlier sends from it have left
            self._staged[name] = buffer
            flat = buffer.typed(tensor.dtype)
        stream = staging.stream(device, "push")
        if after is not None:
            stream.wait_event(after)
        else:
            self._after_caller(stream, device, "push")
        source = tensor.detach()
        if not source.is_contiguous():
            with torch.cuda.stream(stream):  # entering a stream costs more than a small copy: only here
                source = source.contiguous()
        source = source.view(-1)
        if tensor.is_contiguous():
            pieces = [p for p in pieces if not _direct_on_device(self, p[0], p[2], source, after)]
        for block, _, seg in pieces:
            lane = self._lane_blocks.get(block.block_id)
            target = flat[seg.offset:seg.offset + seg.numel] if lane is None else \
                slot_piece(lane, False, block, seg, tensor.dtype)
            _queue_copy(self, target, segment_of(source, seg), block.block_id)
        self._keep.append(source)
        return flat

    def _after_caller(self, stream: "torch.cuda.Stream", device: torch.device, direction: str) -> None:
        """Order a copy stream after the work queued so far on the caller's stream (once per exchange)."""
        if (device, direction) not in self._ordered:
            self._ordered.add((device, direction))
            stream.wait_stream(torch.cuda.current_stream(device))

    def abandon(self) -> None:
        """Drop the exchange (its step failed): nothing more is sent, late answers write nowhere (but
        a server writes destinations in shared memory itself: ``worker/direct.py``), its
        unsent blocks' lane slots are freed once the copies into them landed, a sync step's unsent
        blocks are pushed without a gradient (``_push_nothing``), and the future completes without
        counting as done (``Future.abandon``). Never raises; a second call does nothing."""
        if self._dropped:
            return
        self._dropped = True
        self.future.abandon()
        self._unlaunched.clear()
        self._gathered.clear()
        try:
            for events in self._landed.values():
                for event in events:
                    event.synchronize()
        except RuntimeError as exc:  # a broken device: copies into the slots may still be in flight
            log.warning("worker %d: the lane slots of a dropped exchange stay reserved: %s", self.worker.rank, exc)
        else:
            for block_id, lane in self._lane_blocks.items():
                if block_id not in self._sent:
                    self.worker.lanes.release_unsent(lane, self._blocks[block_id][0])
        _push_nothing(self)
        _tell_gone_again(self)
        self._unsent_to.clear()  # send_ready sends nothing more of a dropped exchange
        self._seal_if_sent()

    def send_ready(self, wait: bool, limit: Optional[int] = None) -> None:
        """Send the blocks whose sources are all here (at most ``limit``); with ``wait``, wait for
        their copies from GPUs (a block of a device lane goes at once: its server waits for them,
        ``DeviceLane.wait_pushed``), else stop at the first block whose copies have not landed."""
        while self._ready and (limit is None or limit > 0) and not self._dropped:
            if limit is not None:
                limit -= 1
            block_id = self._ready[0]
            events = self._landed.get(block_id, ())
            to_device = wait and getattr(self._lane_blocks.get(block_id), "on_device", False)
            if not wait and not all(event.query() for event in events):
                return
            if events and not to_device:
                with self.worker.client.tracer.span("waited for the copies from the GPU", "copy"):
                    for event in events:
                        event.synchronize()
            if not to_device:  # kept otherwise, until answered: a dropped exchange waits for what is here
                self._landed.pop(block_id, None)
            self._ready.popleft()
            self._send_block(*self._blocks[block_id], landed=events if to_device else ())
        self._seal_if_sent()

    def _seal_if_sent(self) -> None:
        if self.all_sent:
            if self._flagged and not self._dropped:
                _queue_flagged(self)
            _release_sources_when_landed(self)
            self.future.seal()

    def _send_block(self, block: Block, parts: list[Part], landed=()) -> None:
        client = self.worker.client
        client.same_epoch(self.epoch)
        req = client.next_id()
        segs = [i for i, _, _ in parts]
        self._unsent_to[block.server] -= 1
        lane = self._lane_blocks.get(block.block_id)
        codecs, pull_codecs = (_codec_names(self.worker.compression, self.op, parts, self._payloads, self._absent)
                               if lane is None else ([], []))
        copies, flag, regions = ([], 0, None) if lane is None else _through_lane(self, lane, block, parts, landed)
        header = self.op(req=req, block=block.block_id, rank=self.worker.rank, dtype=block.dtype,
                         segs=None if len(segs) == len(block.segments) else segs,
                         # more pushes of this exchange follow: a GPU server may wait for them
                         more=bool(self._unsent_to[block.server]) and self.op is not P.Pull,
                         shm=lane is not None and not lane.on_device, ipc=lane is not None and lane.on_device,
                         step=self.step, rollback=client.rollback,
                         absent=[i for i, _, name in parts if name in self._absent],
                         codecs=codecs, pull_codecs=pull_codecs,
                         shared=lane is not None and not lane.on_device and (regions is None or not regions.writes)
                         and self.worker.lanes.reads_shared(block.server, copies), flag=flag,
                         **({} if regions is None else regions.fields()))
        request = Request(self.future, block.server, frames=[P.encode(header)])
        if regions is not None:  # the server reads them where they lie: ours until its work is done
            packed = self._packed.get(block.block_id)
            kept = [packed.grads] if packed is not None else \
                [*self._direct.get(block.block_id, (None, ()))[1], *(self._sources.get(n) for _, _, n in parts)]
            self.future.kept.extend([*(t for t in kept if t is not None), *(c.target for c in copies)])
        if lane is not None:
            request.on_answer = functools.partial(self.worker.lanes.answered, lane, copies, block, flag)
            if regions is not None:
                request.on_answer = functools.partial(_direct_answered, self.worker.lanes.direct, regions,
                                                      lane.on_device, request.on_answer)
            self._sent.add(block.block_id)  # its answer frees its slots from here on
            client.submit(request, req)
            return
        staged: dict[int, Staging] = {}
        for _, seg, name in parts:
            if self.op is not P.Pull and name not in self._absent:
                piece = self._payloads.get((name, seg.offset))
                if piece is None:
                    piece = self._sources[name][seg.offset:seg.offset + seg.numel]
                    if name in self._staged:
                        staged[id(self._staged[name])] = self._staged[name]
                request.frames.append(byte_view(piece))
                request.keep.append(piece)
            if self._dests:
                codec = self.worker.compression.pull_codec(name)
                dest = self._dests[name]
                request.dest.append(dest.piece(seg, request.keep) if codec is None
                                    else dest.packed(seg, request.keep, codec))
        self._sent.add(block.block_id)
        tracker = client.submit(request, req, track=bool(staged))
        for buffer in staged.values():
            buffer.sent(tracker)  # reused only once ZeroMQ is done reading it

    def _destination(self, name: str, tensor: torch.Tensor, after_caller: bool) -> "Destination":
        target = tensor.detach()
        if target.device.type == "cpu":
            if target.is_contiguous():
                return self.worker.plans.destination(name, tensor, lambda: Destination(target.reshape(-1)))
            staging = torch.empty(target.numel(), dtype=target.dtype)
            self.future.add_finalizer(lambda: target.copy_(staging.view(target.shape)))
            return Destination(staging)
        device = target.device
        stream = _pull_stream(self, device, after_caller)
        if target.is_contiguous() and all(block.block_id in self._lane_blocks
                                          for block, _, _ in self.worker.shard_map.pieces_of(name)):
            # straight from the lanes' pull slots
            return self.worker.plans.destination(name, tensor, lambda: Destination(None, target.view(-1), None, stream))
        buffer = self.worker.staging.buffer("pull", name, target)
        buffer.wait()  # the copy out of it for the last pull has finished
        host = buffer.typed(target.dtype)
        if target.is_contiguous():
            return Destination(host, target.view(-1), buffer, stream)

        def copy_whole() -> None:
            with torch.cuda.stream(stream):
                target.copy_(host.view(target.shape), non_blocking=True)
            buffer.copied(stream)

        self.future.add_finalizer(copy_whole)
        return Destination(host)


class Destination:
    """Where one key's pulled values land: a host tensor, and for a GPU tensor its flat device view."""

    def __init__(self, host: Optional[torch.Tensor], device: Optional[torch.Tensor] = None,
                 staging: Optional[Staging] = None, stream: Optional["torch.cuda.Stream"] = None):
        self.host, self.device, self.staging, self.stream = host, device, staging, stream
        self._lane_copies: dict[tuple[int, int, bool], LaneCopy] = {}  # by (block, segment offset, direct): made once

    def piece(self, seg: Segment, keep: list) -> tuple[memoryview, Optional[Callable[[], None]]]:
        end = seg.offset + seg.numel
        host = self.host[seg.offset:end]
        keep.append(host)
        if self.device is None:
            return byte_view(host), None
        device, staging, stream = self.device[seg.offset:end], self.staging, self.stream

        def copy_to_device() -> None:
            with torch.cuda.stream(stream):
                device.copy_(host, non_blocking=True)
            staging.copied(stream)  # the next pull into this buffer waits for the copy

        return byte_view(host), copy_to_device

    def packed(self, seg: Segment, keep: list, codec: Codec) -> tuple[memoryview, Callable[[], None]]:
        """Like ``piece``, for values that come encoded: received apart, decoded into place."""
        view, landed = self.piece(seg, keep)
        host = self.host[seg.offset:seg.offset + seg.numel]
        payload = torch.empty(codec.nbytes(seg.numel), dtype=torch.uint8)
        keep.append(payload)

        def unpack() -> None:
            host.copy_(codec.decode(payload, seg.numel))
            if landed is not None:
                landed()

        return byte_view(payload), unpack

    def target_of(self, seg: Segment) -> torch.Tensor:
        """Where one segment's values land: in the caller's tensor (or in a staging buffer)."""
        return segment_of(self.host if self.device is None else self.device, seg)

    def from_lane(self, block: Block, seg: Segment, direct: bool = False) -> LaneCopy:
        """The copy of one segment out of a lane's pull slot (``direct``: none, the server writes
        the values into place; ``LaneCopy.direct``)."""
        key = (block.block_id, seg.offset, direct)
        copy = self._lane_copies.get(key)
        if copy is None:
            copy = self._lane_copies[key] = LaneCopy(self.target_of(seg), block, seg,
                                                     None if self.device is None else self.stream, direct)
        return copy


__all__ = ["Destination", "Exchange", "add_packed_block", "send_whole", "unpack_block"]
