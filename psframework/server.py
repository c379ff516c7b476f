"""The server role: owns shards on its device, applies pushes, answers pulls.

A server joins the job through the scheduler, receives its blocks of the shard map, and then
serves workers directly. Update semantics per block:

- ``sync``: a step's update is applied once every worker pushed that step (the mean gradient);
  a worker's pull is answered once all of its own pushes are applied.
- ``async``: every push is applied as it arrives; pulls answer at once.
- ``ssp``: like async, but a worker's pull waits until it is at most ``staleness`` pushes ahead
  of the slowest live worker.

Shards on a GPU: frames land in a small ring of pinned host slots and go to the device with
asynchronous copies on the server's own CUDA stream, so receiving the next message overlaps the
copy of the last; the update runs there with torch's fused kernels; replies are copied from the
device into a pinned buffer per block (once per version, however many workers pull it) and go on
the wire once that copy has finished, while the server goes on receiving.

Workers on the server's own host talk to it through shared-memory lanes (``shm.py``): a request
that says ``shm`` carries no frames; its gradients are in the worker's push slot of the block, and
its values are written into the pull slot before the answer (a bare header) goes out.

Run one with ``python -m psframework server`` (ps-launch does this for you).
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from . import checkpoint
from . import protocol as P
from .config import NodeConfig
from .errors import CheckpointError, PSError, ProtocolError
from .node import POLL_SLICE, Membership, RateLimitedLog, join_cluster
from .optim import ShardOptimizer, optimizer_from_wire
from .buffers import byte_view, dtype_from_name, host_copy
from .devices import Staging, StagingRing, init_cuda_early, pick_server_device
from .shm import Lane
from .sharding import Block, ShardMap
from .security import load_secret
from .transport import Socket, Transport, ZmqTransport

log = logging.getLogger("psframework.server")

_DEVICE_POLL = 20e-6  # seconds between looks at the device while answers wait for it
# Shards on a GPU: complete sync steps are applied together once a quarter of the server's bytes
# are due, once no worker has said that more pushes follow, or after this many seconds.
_APPLY_SHARE = 4
_APPLY_WAIT = 0.005


class _Rejected(Exception):
    """A request that is answered with an error and otherwise ignored."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass
class _Pending:
    peer: bytes
    req: int
    rank: int
    segs: list[int]
    need_version: int
    lane: bool = False  # answer through the worker's shared-memory lane


@dataclass
class _Pushed:
    """One worker's gradients for a block, by segment; for a whole block pushed to a GPU also the
    flat tensor they are views of; for a GPU, the event of their upload."""
    grads: dict[int, torch.Tensor]
    whole: Optional[torch.Tensor] = None
    uploaded: Optional[torch.cuda.Event] = None


@dataclass
class _Accum:
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)
    contributors: set[int] = field(default_factory=set)
    whole: Optional[torch.Tensor] = None  # the flat sum that ``tensors`` are views of, if every push was whole
    adds: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (sum, addend) still to add
    uploads: list = field(default_factory=list)  # events of the uploads of its gradients to the GPU


@dataclass
class _BlockState:
    block: Block
    flat: torch.Tensor  # the block's values; ``params`` are views of it, one per segment
    params: list[torch.Tensor]
    first_param: int
    nbytes: list[int]  # of each segment
    clocks: list[int]
    version: int = 0
    accums: dict[int, _Accum] = field(default_factory=dict)
    pulls: list[_Pending] = field(default_factory=list)
    trackers: list = field(default_factory=list)
    # shards on a GPU: the pinned copy that replies are sent from, and the version of each segment in it
    reply: Optional[Staging] = None
    staged: list[int] = field(default_factory=list)
    queued_replies: int = 0

    def wait_sends(self) -> None:
        # a zero-copy reply may still be reading this block's memory
        for tracker in self.trackers:
            tracker.wait()
        self.trackers.clear()

    def byte_offset(self, i: int) -> int:
        return self.block.segments[i].block_offset * self.params[i].element_size()

    def covers(self, segs: list[int]) -> bool:
        """Whether ``segs`` (distinct, validated) is the whole block, so it can move as one copy."""
        return len(segs) == len(self.params)

    def split(self, whole: torch.Tensor) -> dict[int, torch.Tensor]:
        """Views of a flat tensor laid out like the block, one per segment."""
        return {i: whole[s.block_offset:s.block_offset + s.numel] for i, s in enumerate(self.block.segments)}


class Server:
    def __init__(self, config: NodeConfig, transport: Optional[Transport] = None):
        self.config = config
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self.data: Optional[Socket] = None
        self.membership: Optional[Membership] = None
        self.blocks: dict[int, _BlockState] = {}
        self.optimizer: Optional[ShardOptimizer] = None
        self.device = torch.device("cpu")
        self._stream: Optional[torch.cuda.Stream] = None  # updates, and copies of values to the host
        self._upload: Optional[torch.cuda.Stream] = None  # copies of pushed gradients to the device
        self._ring: Optional[StagingRing] = None
        # answers waiting for a device copy: (its event, peer, frames, block whose reply buffer they read)
        self._outbox: deque[tuple[torch.cuda.Event, bytes, list, Optional[_BlockState]]] = deque()
        self._lanes: dict[int, Lane] = {}  # shared-memory lanes of the workers on this host, by rank
        # blocks whose sync step is complete, applied together (``_apply_now``)
        self._due: dict[int, _BlockState] = {}
        self._due_since = 0.0
        self._pushes_follow: set[int] = set()  # workers whose last push said that more follow
        self._bytes = 0  # of all our blocks
        self.applied_updates = 0
        self.received_pushes = 0
        self.lane_requests = 0  # requests that came through a shared-memory lane
        self.apply_bursts = 0  # optimizer steps over due sync blocks
        self.timed_applies = 0  # of them, the ones that went out because the due blocks waited too long
        self._garbage_log = RateLimitedLog(log)

    # -- lifecycle -----------------------------------------------------------------------

    def serve(self) -> int:
        """Join the job and serve until the scheduler says stop. Returns the exit code."""
        try:
            self.data = self.transport.listen(
                self.config.bind_host, 0, max_message_bytes=self.config.max_message_bytes
            )
            init_cuda_early(self.config.device)
            self.membership = join_cluster(
                self.transport, self.config, role="server", address=self.data.address
            )
            requested = self.membership.welcome.get("server_device") or self.config.device
            gpus = torch.cuda.device_count() if requested != "cpu" else 0
            self.device = torch.device(pick_server_device(requested, self.membership.rank,
                                                          self.membership.servers, gpus))
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
                # a stream of our own, so copies and updates never wait on the legacy default stream;
                # high priority, so that on a GPU shared with a worker's backward pass the updates
                # that pass is waiting for are not queued behind its kernels
                self._stream = torch.cuda.Stream(self.device, priority=-1)
                self._upload = torch.cuda.Stream(self.device, priority=-1)
                torch.cuda.set_stream(self._stream)
            log.info("server %d serving on %s, shards on %s", self.membership.rank,
                     self.data.address, self.device)
            return self._loop()
        except PSError as exc:
            log.error("server stopping: %s", exc)
            return 1
        finally:
            self.close()

    def close(self) -> None:
        self._outbox.clear()
        for lane in self._lanes.values():
            lane.close()
        self._lanes.clear()
        for state in self.blocks.values():
            state.trackers.clear()
        if self.membership is not None:
            self.membership.close()
            self.membership = None
        if self.data is not None:
            self.data.close()
            self.data = None
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def _loop(self) -> int:
        membership = self.membership
        while True:
            ready = self.transport.poll([self.data, membership.socket], 0 if self._waiting_on_device else POLL_SLICE)
            if membership.socket in ready:
                for header in membership.receive():
                    handler = {P.SETUP: self._setup, P.SAVE: self._save, P.LOAD: self._load,
                               P.ACTIVATE: self._activate}.get(header["op"])
                    if handler is not None:
                        handler(header)
            if self.data in ready:
                self._drain_data()
            if self._waiting_on_device and not ready:
                self._await_device_or_request()
            if membership.shutdown_requested:
                log.info("server %d: job finished, %d updates applied", membership.rank, self.applied_updates)
                return 0
            if membership.peers_changed:
                for state in self.blocks.values():
                    self._complete_steps(state)
                self._apply_due()
                self._fail_impossible_waits()
                self._flush_replies(wait=True)
            membership.check(peers=False)
            membership.stats = {"applied": self.applied_updates, "pushes": self.received_pushes}

    @property
    def _waiting_on_device(self) -> bool:
        """Answers wait for device work, or complete steps for their uploads."""
        return bool(self._outbox or self._due)

    def _await_device_or_request(self) -> None:
        """Apply the steps whose uploads have landed and send the answers whose device work is
        done, until a request comes in or nothing waits (at most one poll slice). Blocking on the
        device instead would hold back the next request, whose upload could run beside the
        copies that the answers wait for."""
        deadline = time.monotonic() + POLL_SLICE
        while self._waiting_on_device and time.monotonic() < deadline:
            self._apply_due()
            self._flush_replies(wait=False)
            if self.transport.poll([self.data], 0):
                return
            time.sleep(_DEVICE_POLL)
        self._flush_replies(wait=False)

    def _drain_data(self) -> None:
        # bounded so heartbeats keep flowing under a flood of requests
        for _ in range(256):
            if not self.transport.poll([self.data], 0):
                break
            self._handle_one()
            self._flush_replies(wait=False)
        self._apply_due()

    # -- setup ---------------------------------------------------------------------------

    def _setup(self, header: dict) -> None:
        shard_map = ShardMap.from_wire(header["shard_map"])
        spec = optimizer_from_wire(header["optimizer"])
        rank = self.membership.rank
        num_workers = self.membership.num_workers
        on_gpu = self.device.type == "cuda"
        params: list[torch.Tensor] = []
        self.blocks.clear()
        my_blocks = shard_map.blocks_of_server(rank)
        for block in my_blocks:
            flat = torch.zeros(block.numel, dtype=dtype_from_name(block.dtype), device=self.device)
            seg_params = [flat[s.block_offset:s.block_offset + s.numel] for s in block.segments]
            self.blocks[block.block_id] = _BlockState(
                block=block, flat=flat, params=seg_params, first_param=len(params),
                nbytes=[p.numel() * p.element_size() for p in seg_params], clocks=[0] * num_workers,
                reply=Staging(block.nbytes) if on_gpu else None, staged=[-1] * len(block.segments),
            )
            params.extend(seg_params)
        self._bytes = sum(b.nbytes for b in my_blocks)
        if on_gpu and my_blocks:
            self._ring = StagingRing(max(b.nbytes for b in my_blocks))
        self.optimizer = ShardOptimizer(spec, params)
        self.membership.send({"op": P.SETUP_DONE, "blocks": len(self.blocks)})
        log.info("server %d holds %d blocks, %.1f MiB", rank, len(self.blocks),
                 sum(b.block.nbytes for b in self.blocks.values()) / 2**20)

    # -- requests ------------------------------------------------------------------------

    def _handle_one(self) -> None:
        peer, head = None, b""
        try:
            peer, head = self.data.recv_header()
            header = P.unpack_header(head)
        except ProtocolError as exc:
            self._garbage_log.warning("dropped malformed message from peer %r: %s", peer, exc)
            self.data.skip_rest()
            return
        req = header.get("req")
        try:
            self._dispatch(peer, header)
        except _Rejected as exc:
            self.data.skip_rest()
            self._garbage_log.warning("rejected %s from %r: %s", header.get("op"), peer, exc)
            self.data.send([P.pack_header(P.error_header(exc.kind, str(exc), req=req))], peer=peer)

    def _dispatch(self, peer: bytes, header: dict) -> None:
        op = header["op"]
        if op == P.STATS:
            self.data.skip_rest()
            reply = {"op": P.STATS, "req": header.get("req"), "applied": self.applied_updates,
                     "pushes": self.received_pushes, "blocks": len(self.blocks), "device": str(self.device),
                     "lanes": sorted(self._lanes), "lane_requests": self.lane_requests,
                     "apply_bursts": self.apply_bursts, "timed_applies": self.timed_applies}
            self.data.send([P.pack_header(reply)], peer=peer)
            return
        if op == P.ATTACH:
            self._attach(peer, header)
            return
        if op not in (P.PUSH, P.PULL, P.PUSH_PULL, P.INIT):
            raise _Rejected(P.PROTOCOL, f"unknown op {op!r}")
        state, segs, rank, req = self._validate(header)
        if op != P.PULL and header.get("more"):
            self._pushes_follow.add(rank)
        elif op != P.PULL:
            self._pushes_follow.discard(rank)
        lane = self._lane_of(header, rank, op)
        self.lane_requests += lane is not None
        if op == P.INIT:
            pushed = self._receive_frames(state, segs)
            if pushed.uploaded is not None:
                self._stream.wait_event(pushed.uploaded)
            state.wait_sends()
            for i, value in pushed.grads.items():
                state.params[i].copy_(value)
                state.staged[i] = -1
            self.data.send([P.pack_header({"op": P.ACK, "req": req})], peer=peer)
            return
        pushed = None
        if lane is not None:
            if op != P.PULL:
                pushed = self._lane_grads(state, segs, lane)
                self._push(state, pushed, rank, owned=self._ring is not None)
        elif op in (P.PUSH, P.PUSH_PULL):
            self._push(state, self._receive_frames(state, segs), rank)
        else:
            self.data.skip_rest()
        if op == P.PUSH:
            # a lane's push slot is reused once acknowledged: on a GPU, after the upload out of it
            self._answer(peer, [P.pack_header({"op": P.ACK, "req": req})],
                         after=pushed.uploaded if pushed is not None else None)
        else:
            need = state.clocks[rank]
            state.pulls.append(_Pending(peer, req, rank, segs, need, lane=lane is not None))
        self._answer_pulls(state)

    def _answer(self, peer: bytes, frames: list, after: Optional[torch.cuda.Event]) -> None:
        """Send an answer now, or once the device work before ``after`` is done."""
        if after is None:
            self.data.send(frames, peer=peer)
        else:
            self._outbox.append((after, peer, frames, None))

    def _work_so_far(self) -> torch.cuda.Event:
        done = torch.cuda.Event()
        done.record(self._stream)
        return done

    # -- shared-memory lanes -------------------------------------------------------------

    def _attach(self, peer: bytes, header: dict) -> None:
        rank, path, token = header.get("rank"), header.get("path"), header.get("token")
        if not (isinstance(rank, int) and 0 <= rank < self.membership.num_workers and isinstance(path, str)
                and isinstance(token, bytes)):
            raise _Rejected(P.BAD_REQUEST, "attach needs an integer worker rank, a path and a token")
        self.data.skip_rest()
        blocks = [(b.block.block_id, b.block.nbytes) for b in self.blocks.values()]
        try:
            lane = Lane.attach(path, token, blocks)
            if self.device.type == "cuda":
                lane.pin(self.device)
        except Exception as exc:  # whatever the reason, the worker goes on over the socket
            raise _Rejected(P.BAD_REQUEST, f"server {self.membership.rank} cannot map lane {path}: {exc}") from None
        old = self._lanes.pop(rank, None)
        if old is not None:
            old.close()
        self._lanes[rank] = lane
        self.data.send([P.pack_header({"op": P.ACK, "req": header.get("req")})], peer=peer)

    def _lane_of(self, header: dict, rank: int, op: str) -> Optional[Lane]:
        if not header.get("shm"):
            return None
        lane = self._lanes.get(rank)
        if lane is None or op == P.INIT:
            raise _Rejected(P.BAD_REQUEST, f"{op} through a shared-memory lane, but worker {rank} has none "
                                           f"attached to server {self.membership.rank}")
        if self.data.more():
            raise _Rejected(P.PROTOCOL, "a lane request carries no frames")
        return lane

    def _lane_grads(self, state: _BlockState, segs: list[int], lane: Lane) -> _Pushed:
        """A lane push's gradients: views of the worker's push slot (host shards), or device copies
        of it (GPU shards)."""
        if self._ring is None:
            return _Pushed({i: _lane_slot(lane.push_slot, state, i) for i in segs})
        slot = lane.push_slot(state.block.block_id, 0, state.block.nbytes).view(state.flat.dtype)
        return self._to_device(state, segs, slot)

    def _answer_by_lane(self, state: _BlockState, pending: _Pending, header: dict) -> None:
        lane = self._lanes.get(pending.rank)
        if lane is None:  # the worker rejoined and its lane went with the old process
            error = P.error_header(P.PEER_LOST, f"worker {pending.rank} has no lane any more", req=pending.req)
            self.data.send([P.pack_header(error)], peer=pending.peer)
            return
        if self._ring is None:
            for i in pending.segs:
                host_copy(_lane_slot(lane.pull_slot, state, i), state.params[i])
        else:
            self._download(state, pending.segs,
                           lane.pull_slot(state.block.block_id, 0, state.block.nbytes).view(state.flat.dtype))
        self._answer(pending.peer, [P.pack_header({**header, "shm": 1})],
                     after=self._work_so_far() if self._ring is not None else None)

    def _validate(self, header: dict) -> tuple[_BlockState, list[int], int, int]:
        if self.optimizer is None:
            raise _Rejected(P.BAD_REQUEST, "this server has no tensors yet: call register() first")
        req, block_id, rank = header.get("req"), header.get("block"), header.get("rank")
        if not isinstance(req, int):
            raise _Rejected(P.PROTOCOL, "request without integer 'req'")
        state = self.blocks.get(block_id) if isinstance(block_id, int) else None
        if state is None:
            raise _Rejected(P.BAD_REQUEST, f"block {block_id!r} is not held by server {self.membership.rank}")
        if not isinstance(rank, int) or not 0 <= rank < len(state.clocks):
            raise _Rejected(P.BAD_REQUEST, f"bad worker rank {rank!r}")
        segs = header.get("segs")
        n = len(state.block.segments)
        if segs is None:
            segs = list(range(n))
        if (not isinstance(segs, list) or not all(isinstance(i, int) and 0 <= i < n for i in segs)
                or len(set(segs)) != len(segs)):
            raise _Rejected(P.BAD_REQUEST, f"bad segment list for block {block_id}")
        dtype = header.get("dtype", state.block.dtype)
        if dtype != state.block.dtype:
            keys = ", ".join(state.block.segments[i].key for i in segs)
            raise _Rejected(P.BAD_REQUEST, f"dtype {dtype} does not match {state.block.dtype} of {keys}")
        return state, segs, rank, req

    def _receive_frames(self, state: _BlockState, segs: list[int]) -> _Pushed:
        """One frame per segment. Shards in host memory: the received messages themselves, ours to
        keep and sum into (copying each into a preallocated buffer took a third of the server's CPU
        time per round trip, benchmarks/pushpull.py). Shards on a GPU: fresh device tensors, copied
        from a reused pinned receive slot on our stream (see ``_to_device``)."""
        slot = self._ring.take() if self._ring is not None else None
        tensors: dict[int, torch.Tensor] = {}
        for i in segs:
            if not self.data.more():
                raise _Rejected(P.PROTOCOL, f"block {state.block.block_id}: {len(segs)} frames announced, fewer sent")
            expected = state.nbytes[i]
            if slot is None:
                frame = self.data.recv_buffer()
                got = len(memoryview(frame))
                if got == expected:
                    tensors[i] = _host_tensor(frame, state.params[i].dtype)
            else:
                got = self.data.recv_into(slot.view(state.byte_offset(i), expected))
            if got != expected:
                seg = state.block.segments[i]
                raise _Rejected(
                    P.BAD_REQUEST,
                    f"frame for {seg.key!r} (elements {seg.offset}..{seg.offset + seg.numel}) has "
                    f"{got} bytes, expected {expected}",
                )
        if self.data.more():
            raise _Rejected(P.PROTOCOL, f"block {state.block.block_id}: more frames than announced")
        if slot is None:
            return _Pushed(tensors)
        pushed = self._to_device(state, segs, slot.typed(state.flat.dtype, 0, state.block.numel))
        slot.copied(self._upload)  # the slot is reused once these copies are done
        return pushed

    def _to_device(self, state: _BlockState, segs: list[int], host: torch.Tensor) -> _Pushed:
        """Copy pushed gradients of ``segs`` from ``host`` (laid out like the block) to the device on
        the upload stream, which runs beside the copies of values to the host on ours. A whole
        block is one copy. Our stream does not wait for it on the device: a stream of ours that
        waits keeps our process on a GPU that a worker's backward pass is using, so its kernels
        go out only once the upload has landed (``_apply_due``)."""
        whole = None
        with torch.cuda.stream(self._upload):
            if state.covers(segs):
                whole = host.to(self.device, non_blocking=True)
                values, fresh = state.split(whole), [whole]
            else:
                views = state.split(host)
                values = {i: views[i].to(self.device, non_blocking=True) for i in segs}
                fresh = list(values.values())
        uploaded = torch.cuda.Event()
        uploaded.record(self._upload)
        for tensor in fresh:
            tensor.record_stream(self._stream)  # allocated on the upload stream, used and freed on ours
        return _Pushed(values, whole, uploaded)

    def _download(self, state: _BlockState, segs: list[int], host: torch.Tensor) -> None:
        """Queue on our stream the copies of the values of ``segs`` into ``host`` (pinned, laid out
        like the block): one copy for a whole block."""
        if state.covers(segs):
            host.copy_(state.flat, non_blocking=True)
            return
        views = state.split(host)
        for i in segs:
            views[i].copy_(state.params[i], non_blocking=True)

    # -- update semantics ----------------------------------------------------------------

    def _push(self, state: _BlockState, pushed: _Pushed, rank: int, owned: bool = True) -> None:
        """Apply or accumulate one worker's push. ``owned``: the gradients are ours to keep (not
        views of a lane slot, which the worker reuses once answered)."""
        self.received_pushes += 1
        step = state.clocks[rank]
        state.clocks[rank] += 1
        grads, whole = pushed.grads, pushed.whole
        if self.membership.mode != "sync":
            if pushed.uploaded is not None:
                self._stream.wait_event(pushed.uploaded)
            self._apply([(state, grads)], scale=1.0)
            state.version += 1
            return
        accum = state.accums.setdefault(step, _Accum())
        if pushed.uploaded is not None:
            accum.uploads.append(pushed.uploaded)
        if whole is not None and not accum.tensors:
            accum.whole = whole if owned else whole.clone()
            accum.tensors = state.split(accum.whole)
        elif whole is not None and accum.whole is not None:
            self._add(accum, accum.whole, whole, owned)
        else:
            for i, grad in grads.items():
                held = accum.tensors.get(i)
                if held is None:
                    # received host messages and fresh device tensors are ours to keep and sum into
                    accum.tensors[i] = grad if owned else grad.clone()
                else:
                    self._add(accum, held, grad.to(self.device, non_blocking=True), owned)
        accum.contributors.add(rank)
        self._complete_steps(state)

    @staticmethod
    def _add(accum: _Accum, total: torch.Tensor, addend: torch.Tensor, owned: bool) -> None:
        """Sum now what the worker will reuse; what is ours is summed with the others in one go."""
        if owned:
            accum.adds.append((total, addend))
        else:
            total.add_(addend)

    def _active_workers(self) -> set[int]:
        """Workers a sync step waits for: all of them, or in an elastic job those still in it."""
        everyone = set(range(self.membership.num_workers))
        return everyone - self.membership.departed_workers if self.membership.elastic else everyone

    def _complete_steps(self, state: _BlockState) -> None:
        """Mark the block due if every worker the step waits for has pushed its current step."""
        ready = state.accums.get(state.version)
        if ready is not None and self._active_workers() <= ready.contributors:
            if not self._due:
                self._due_since = time.monotonic()
            self._due[state.block.block_id] = state

    def _apply_now(self) -> bool:
        """Whether to apply the due blocks now. Shards in host memory: always. On a GPU that a
        worker's backward pass is using, every burst of our kernels costs that pass a switch
        between the two processes (their kernels took 5 ms longer per ResNet-50 step when we
        applied each block as it completed, benchmarks/gpu.py --trace), so while a worker says
        that more of its pushes follow we wait for a quarter of our bytes, or at most _APPLY_WAIT."""
        if self._ring is None or not self._pushes_follow & self._active_workers():
            return True
        if sum(state.block.nbytes for state in self._due.values()) * _APPLY_SHARE >= self._bytes:
            return True
        if time.monotonic() - self._due_since < _APPLY_WAIT:
            return False
        self.timed_applies += 1
        return True

    def _apply_due(self) -> None:
        """Apply the complete sync steps of the due blocks whose uploads have landed: one sum and
        one optimizer step for all of them (a block with several complete steps goes round once
        per step), then answer the pulls that waited for them. The uploads are done, so our
        kernels run at once (and see the gradients) without our stream waiting for them."""
        if not self._due or not self._apply_now():
            return
        while True:
            steps = []
            for block_id, state in list(self._due.items()):
                if all(event.query() for event in state.accums[state.version].uploads):
                    del self._due[block_id]
                    steps.append((state, state.accums.pop(state.version)))
            if not steps:
                return
            adds = [pair for _, accum in steps for pair in accum.adds]
            if adds:
                torch._foreach_add_([total for total, _ in adds], [addend for _, addend in adds])
            by_scale: dict[float, list] = {}
            for state, accum in steps:
                # the mean over those who pushed: equal to all workers unless an elastic job shrank
                by_scale.setdefault(1.0 / len(accum.contributors), []).append((state, accum.tensors))
            for scale, group in by_scale.items():
                self._apply(group, scale)
                self.apply_bursts += 1
            for state, _ in steps:
                state.version += 1
                self._complete_steps(state)
                self._answer_pulls(state)

    def _apply(self, group: list[tuple[_BlockState, dict[int, torch.Tensor]]], scale: float) -> None:
        """One optimizer step over the gradients (by segment) of each block in ``group``."""
        grads = {}
        for state, tensors in group:
            state.wait_sends()  # replies of host shards are sent straight from the parameters
            for i, grad in tensors.items():
                grads[state.first_param + i] = grad.to(self.device, non_blocking=True)
        self.optimizer.step(grads, scale=scale)
        self.applied_updates += len(group)

    def _pull_ready(self, state: _BlockState, pending: _Pending) -> bool:
        if state.version < pending.need_version and self.membership.mode == "sync":
            return False
        if self.membership.mode == "ssp":
            gone = self.membership.left_workers | self.membership.departed_workers
            live = [c for w, c in enumerate(state.clocks) if w not in gone]
            slowest = min(live) if live else pending.need_version
            return pending.need_version - slowest <= self.membership.staleness
        return True

    def _answer_pulls(self, state: _BlockState) -> None:
        waiting = []
        for pending in state.pulls:
            if self._pull_ready(state, pending):
                self._send_values(state, pending)
            else:
                waiting.append(pending)
        state.pulls = waiting

    def _send_values(self, state: _BlockState, pending: _Pending) -> None:
        header = {"op": P.VALUES, "req": pending.req, "version": state.version,
                  "min_clock": min(state.clocks)}
        if pending.lane:
            self._answer_by_lane(state, pending, header)
            return
        if state.reply is not None:
            self._queue_reply(state, pending, P.pack_header(header))
            return
        frames = [P.pack_header(header)] + [byte_view(state.params[i]) for i in pending.segs]
        tracker = self.data.send(frames, peer=pending.peer, track=True)
        if tracker is not None and not tracker.done:
            state.trackers.append(tracker)

    def _queue_reply(self, state: _BlockState, pending: _Pending, head: bytes) -> None:
        """Copy the values to the block's pinned reply buffer (unless this version is there already)
        and queue the reply; it goes on the wire once the copy has finished."""
        stale = [i for i in pending.segs if state.staged[i] != state.version]
        if stale:
            if state.queued_replies:
                self._flush_replies(wait=True)
            state.reply.wait(lambda: self.membership.check(peers=False))  # earlier replies may read it
            self._download(state, stale, state.reply.typed(state.flat.dtype, 0, state.block.numel))
            for i in stale:
                state.staged[i] = state.version
        done = torch.cuda.Event()
        done.record(self._stream)
        frames = [head] + [state.reply.view(state.byte_offset(i), state.params[i].numel()
                                            * state.params[i].element_size()) for i in pending.segs]
        state.queued_replies += 1
        self._outbox.append((done, pending.peer, frames, state))

    def _flush_replies(self, wait: bool) -> None:
        """Send the queued replies whose copies from the device have finished (all, with ``wait``)."""
        while self._outbox:
            done, peer, frames, state = self._outbox[0]
            if not wait and not done.query():
                return
            done.synchronize()
            self._outbox.popleft()
            tracker = self.data.send(frames, peer=peer, track=True)
            if state is not None:
                state.queued_replies -= 1
                state.reply.sent(tracker)

    def _fail_impossible_waits(self) -> None:
        """Answer waits that can never be satisfied because a worker left or died."""
        gone = self.membership.gone_workers()
        for state in self.blocks.values():
            still = []
            for pending in state.pulls:
                reason = self._impossible(state, pending, gone)
                if reason is None:
                    still.append(pending)
                    continue
                error = P.error_header(P.PEER_LOST, reason, req=pending.req)
                self.data.send([P.pack_header(error)], peer=pending.peer)
            state.pulls = still
            self._answer_pulls(state)

    def _impossible(self, state: _BlockState, pending: _Pending, gone: dict[int, str]) -> Optional[str]:
        mode = self.membership.mode
        if mode == "async":
            return None
        needed = pending.need_version - (self.membership.staleness if mode == "ssp" else 0)
        for worker, why in gone.items():
            if (mode == "ssp" and worker in self.membership.left_workers) or self.membership.elastic:
                continue  # a finished (ssp) or departed (elastic) worker no longer holds the others back
            if state.clocks[worker] < needed:
                return (f"{why} after {state.clocks[worker]} pushes to block {state.block.block_id}, so "
                        f"this worker's wait for clock {pending.need_version} can never be satisfied")
        return None


    def _activate(self, header: dict) -> None:
        """A worker joined late: it takes part from each block's current step on."""
        worker = int(header["worker"])
        self.membership.rejoined(worker, int(header.get("epoch", 0)))
        for state in self.blocks.values():
            others = [c for w, c in enumerate(state.clocks) if w != worker]
            state.clocks[worker] = state.version if self.membership.mode == "sync" else min(others, default=0)
        self.membership.send({"op": P.ACTIVATED, "worker": worker})

    # -- checkpoints ---------------------------------------------------------------------

    def _save(self, header: dict) -> None:
        path = Path(str(header["path"]))
        try:
            payload = {
                "rank": self.membership.rank,
                "blocks": {bid: {"params": [p.detach().cpu() for p in st.params], "clocks": list(st.clocks),
                                 "version": st.version} for bid, st in self.blocks.items()},
                "optimizer": self.optimizer.state_dict(),
            }
            sha256, size = checkpoint.save_shard(path, payload)
        except Exception as exc:  # disk full, permissions: the job must hear it, not hang
            self.membership.send(P.error_header(P.CHECKPOINT_ERROR, f"cannot write {path}: {exc}"))
            return
        self.membership.send({"op": P.SAVED, "path": str(path), "sha256": sha256, "bytes": size})

    def _load(self, header: dict) -> None:
        path = Path(str(header["path"]))
        try:
            payload = checkpoint.load_shard(path, str(header["sha256"]))
            saved = payload["blocks"]
            if set(saved) != set(self.blocks):
                raise CheckpointError(f"{path} holds blocks {sorted(saved)[:5]}..., this server "
                                      f"holds {sorted(self.blocks)[:5]}...")
            for block_id, state in self.blocks.items():
                state.wait_sends()
                for param, value in zip(state.params, saved[block_id]["params"]):
                    param.copy_(value)
                state.clocks = list(saved[block_id]["clocks"])
                state.version = int(saved[block_id]["version"])
                state.accums.clear()
                self._due.pop(block_id, None)
                state.staged = [-1] * len(state.staged)  # the GPU reply cache holds pre-restore values
            self.optimizer.load_state_dict(payload["optimizer"])
        except Exception as exc:
            self.membership.send(P.error_header(P.CHECKPOINT_ERROR, f"cannot restore {path}: {exc}"))
            return
        log.info("server %d restored %s", self.membership.rank, path)
        self.membership.send({"op": P.LOADED, "path": str(path)})


def _lane_slot(area, state: _BlockState, i: int) -> torch.Tensor:
    """Segment ``i`` of a block in a lane's push or pull area, typed like its parameter."""
    return area(state.block.block_id, state.byte_offset(i), state.nbytes[i]).view(state.params[i].dtype)


def _host_tensor(frame: object, dtype: torch.dtype) -> torch.Tensor:
    """A received frame as a flat tensor, without a copy where its memory is aligned."""
    if not len(memoryview(frame)):
        return torch.empty(0, dtype=dtype)
    tensor = torch.frombuffer(frame, dtype=dtype)
    # ZeroMQ lands messages under 8 KiB at any offset of its read buffer; copy those few bytes
    return tensor.clone() if tensor.data_ptr() % tensor.element_size() else tensor


def main(config: NodeConfig) -> int:
    return Server(config).serve()


if __name__ == "__main__":  # pragma: no cover - `python -m psframework server` is the entry point
    raise SystemExit(os.EX_USAGE)
