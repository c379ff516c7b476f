"""Moving a server's tensors between the wire (or a lane) and its device.

``HostIO``: shards in host memory. Pushed frames are used as received (the messages themselves,
zero-copy), lane gradients as views of the lane slot, and replies are sent zero-copy straight
from the parameters.

``CudaIO``: shards on a GPU. Frames land in a small ring of pinned host slots and go to the
device with asynchronous copies on an upload stream of their own, so receiving the next message
overlaps the copy of the last; the update runs on the server's stream with torch's fused kernels;
replies are copied from the device into a pinned buffer per block (once per version, however many
workers pull it) and go on the wire once that copy has finished (the outbox), while the server
goes on receiving.

Compressed frames (``ps.compress``) are decoded on the server's device before aggregation; a
pull that asks for rounded values gets them encoded from the full-precision values.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch

from .. import protocol as P
from ..buffers import byte_view, host_copy, host_tensor
from ..compress import Codec, payload_bytes
from ..devices import Staging, StagingRing
from ..trace import Tracer
from ..transport import Socket
from .store import BlockState, Pending, Pushed

OnSent = Callable[[Optional[object]], None]
Codecs = Optional[list[Optional[Codec]]]  # one per segment received or sent (None: raw)


class DeviceIO:
    """The interface both devices share."""

    on_gpu = False

    def __init__(self, data: Socket):
        self.data = data
        self.push_bytes = 0  # of the tensor frames of pushes received over the socket, as they came

    def setup(self, blocks: list) -> None:
        """The server now holds these blocks (of the shard map)."""

    def receive_frames(self, state: BlockState, segs: list[int], codecs: Codecs = None) -> Pushed:
        """One frame per segment from the data socket, checked against the block's layout (and
        against each codec's size), decoded where it has a codec."""
        raise NotImplementedError

    def from_host(self, state: BlockState, segs: list[int], host: torch.Tensor, held: bool = False,
                  views: Optional[dict[int, torch.Tensor]] = None) -> Pushed:
        """Gradients of ``segs`` from ``host``, a flat tensor laid out like the block (a lane slot,
        in host memory or, for a device lane, on a GPU). ``held``: the worker leaves ``host`` alone
        until we answer. ``views``: ``host`` split by segment, if the caller keeps them."""
        raise NotImplementedError

    def order_after_upload(self, pushed: Pushed) -> None:
        """Our next kernels must see ``pushed``'s gradients."""

    def send_values(self, state: BlockState, pending: Pending, head: bytes, on_sent: OnSent) -> None:
        """Answer a pull over the socket: the header, then one frame per segment; ``on_sent`` gets
        the tracker of the zero-copy send once it is handed to ZeroMQ (None if it was copied)."""
        raise NotImplementedError

    def values_into(self, state: BlockState, segs: list[int], host: torch.Tensor,
                    done: Optional[torch.cuda.Event] = None) -> Optional[torch.cuda.Event]:
        """Copy the values of ``segs`` into ``host`` (laid out like the block); returns the event to
        wait for before the copy may be read, if it is asynchronous: ``done`` where given (an
        interprocess event another process waits for), else a fresh one."""
        raise NotImplementedError

    def send_rows(self, pending, head: bytes, rows: list[torch.Tensor], on_sent: OnSent) -> None:
        """Answer a pull of table rows: the header, then one frame of rows (on the host) per table."""
        on_sent(self.data.send([head] + [byte_view(r) for r in rows], peer=pending.peer, track=True))

    def answer(self, peer: bytes, frames: list, after: Optional[torch.cuda.Event] = None) -> None:
        """Send an answer now, or once the device work before ``after`` is done."""
        self.data.send(frames, peer=peer)

    def flush(self, wait: bool) -> None:
        """Send the answers whose device work is done (all of them, with ``wait``)."""

    @property
    def waiting(self) -> bool:
        """Answers wait for device work."""
        return False

    def close(self) -> None:
        """Forget the answers still waiting (we are shutting down)."""

    def frame_sizes_check(self, state: BlockState, segs: list[int], receive: Callable[[int, int], int],
                          codecs: Codecs = None) -> None:
        """Receive one frame per segment with ``receive(i, expected) -> got``, refusing a request
        whose frames do not match the block."""
        for k, i in enumerate(segs):
            if not self.data.more():
                raise P.Rejected(P.PROTOCOL, f"block {state.block.block_id}: {len(segs)} frames announced, "
                                             "fewer sent")
            codec = codecs[k] if codecs else None
            seg = state.block.segments[i]
            expected = state.nbytes[i] if codec is None else payload_bytes(codec, seg.numel)
            got = receive(i, expected)
            self.push_bytes += max(got, 0)
            if got != expected:
                raise P.Rejected(P.BAD_REQUEST, f"frame for {seg.key!r} (elements {seg.offset}.."
                                                f"{seg.offset + seg.numel}{', ' + codec.wire if codec else ''}) "
                                                f"has {got} bytes, expected {expected}")
        if self.data.more():
            raise P.Rejected(P.PROTOCOL, f"block {state.block.block_id}: more frames than announced")


class HostIO(DeviceIO):
    def receive_frames(self, state: BlockState, segs: list[int], codecs: Codecs = None) -> Pushed:
        """The received messages themselves, ours to keep and sum into (copying each into a
        preallocated buffer took a third of the server's CPU time per round trip,
        benchmarks/pushpull.py), or what they decode to."""
        tensors: dict[int, torch.Tensor] = {}
        codec_of = dict(zip(segs, codecs or []))

        def receive(i: int, expected: int) -> int:
            frame = self.data.recv_buffer()
            got = len(memoryview(frame))
            codec = codec_of.get(i)
            if got == expected and codec is None:
                tensors[i] = host_tensor(frame, state.params[i].dtype)
            elif got == expected:
                tensors[i] = codec.decode(host_tensor(frame, torch.uint8), state.params[i].numel())
            return got

        self.frame_sizes_check(state, segs, receive, codecs)
        return Pushed(tensors)

    def from_host(self, state: BlockState, segs: list[int], host: torch.Tensor, held: bool = False,
                  views: Optional[dict[int, torch.Tensor]] = None) -> Pushed:
        views = state.split(host) if views is None else views
        return Pushed({i: views[i] for i in segs}, owned=False)

    def send_values(self, state: BlockState, pending: Pending, head: bytes, on_sent: OnSent) -> None:
        frames = [head] + [byte_view(_unchanging(state, i) if codec is None else state.encoded(i, codec))
                           for i, codec in pending.segment_codecs()]
        tracker = self.data.send(frames, peer=pending.peer, track=True)
        if tracker is not None and not tracker.done and not state.shared:
            state.trackers.append(tracker)
        on_sent(tracker)

    def values_into(self, state: BlockState, segs: list[int], host: torch.Tensor,
                    done: Optional[torch.cuda.Event] = None) -> None:
        if state.covers(segs):  # a block of a hundred tensors: one copy, not a hundred
            host_copy(host, state.flat)
            return None
        views = state.split(host)
        for i in segs:
            host_copy(views[i], state.params[i])
        return None


def _unchanging(state: BlockState, i: int) -> torch.Tensor:
    """Segment ``i`` as a zero-copy reply may send it: shared values change in place, where the
    workers of this host read them, so those go as the version's copy (a reply of a private block
    that is still unsent when an update comes moves the block instead: ``BlockState.make_writable``)."""
    return state.version_copy()[i] if state.shared else state.params[i]


class CudaIO(DeviceIO):
    on_gpu = True

    def __init__(self, data: Socket, device: torch.device, tracer: Optional[Tracer] = None):
        super().__init__(data)
        self.device = device
        self.tracer = tracer or Tracer(None)
        # streams of our own, so copies and updates never wait on the legacy default stream; high
        # priority, so that on a GPU shared with a worker's backward pass the updates that pass is
        # waiting for are not queued behind its kernels
        self.stream = torch.cuda.Stream(device, priority=-1)  # updates, and copies of values to the host
        self.upload = torch.cuda.Stream(device, priority=-1)  # copies of pushed gradients to the device
        torch.cuda.set_stream(self.stream)
        self._ring: Optional[StagingRing] = None  # made at the first message with values (_receive_slot)
        self._ring_bytes = 0
        # answers waiting for a device copy: (its event, peer, frames, block whose reply buffer they
        # read, what to tell once sent, when it was queued for a trace)
        self._outbox: deque[tuple[torch.cuda.Event, bytes, list, Optional[BlockState], Optional[OnSent],
                                  float]] = deque()

    def setup(self, blocks: list) -> None:
        self._ring_bytes, self._ring = max((b.nbytes for b in blocks), default=0), None

    def _receive_slot(self) -> Staging:
        """A pinned slot for a push over the socket (the workers' initial values come this way too).
        The ring of them, each the size of the largest block, is made at the first one; blocks of
        one GPU server reached by device lanes are up to 1 GiB, and get two slots, not four."""
        if self._ring is None:
            self._ring = StagingRing(self._ring_bytes, slots=4 if self._ring_bytes <= 256 << 20 else 2)
        return self._ring.take()

    def receive_frames(self, state: BlockState, segs: list[int], codecs: Codecs = None) -> Pushed:
        """Fresh device tensors, copied from a reused pinned receive slot on the upload stream;
        compressed frames are uploaded as they came and decoded there."""
        slot = self._receive_slot()
        codec_of = dict(zip(segs, codecs or []))
        packed: dict[int, object] = {}

        def receive(i: int, expected: int) -> int:
            if codec_of.get(i) is None:
                return self.data.recv_into(slot.view(state.byte_offset(i), expected))
            packed[i] = self.data.recv_buffer()
            return len(memoryview(packed[i]))

        self.frame_sizes_check(state, segs, receive, codecs)
        raw = [i for i in segs if i not in packed]
        pushed = self.from_host(state, raw, slot.typed(state.flat.dtype, 0, state.block.numel))
        slot.copied(self.upload)  # the slot is reused once these copies are done
        return self._decoded(state, pushed, {i: (packed[i], codec_of[i]) for i in packed}) if packed else pushed

    def _decoded(self, state: BlockState, pushed: Pushed, packed: dict) -> Pushed:
        """``pushed`` with the compressed segments uploaded and decoded on the upload stream."""
        with torch.cuda.stream(self.upload):
            for i, (frame, codec) in packed.items():
                payload = host_tensor(frame, torch.uint8).to(self.device, non_blocking=True)
                pushed.grads[i] = codec.decode(payload, state.params[i].numel()).to(state.flat.dtype)
                pushed.grads[i].record_stream(self.stream)
        pushed.uploaded = torch.cuda.Event()
        pushed.uploaded.record(self.upload)
        pushed.whole = None
        return pushed

    def from_host(self, state: BlockState, segs: list[int], host: torch.Tensor, held: bool = False,
                  views: Optional[dict[int, torch.Tensor]] = None) -> Pushed:
        """Copy pushed gradients to the device on the upload stream, which runs beside the copies of
        values to the host on ours. A whole block is one copy. Our stream does not wait for it on
        the device: a stream of ours that waits keeps our process on a GPU that a worker's backward
        pass is using, so our kernels go out only once the upload has landed (``Sync.apply_due``).
        A held slot of a device lane on our GPU is read where it is: the worker's copy into it has
        finished before it sent the request, and our answer waits for the step that reads it."""
        if held and _same_gpu(host.device, self.device):
            views = state.split(host) if views is None else views
            if state.covers(segs):
                return Pushed(dict(views), whole=host, owned=False)
            return Pushed({i: views[i] for i in segs}, owned=False)
        whole = None
        with torch.cuda.stream(self.upload):  # copy=True: a device lane's slot is on a GPU already
            if state.covers(segs):
                whole = host.to(self.device, non_blocking=True, copy=True)
                values, fresh = state.split(whole), [whole]
            else:
                views = state.split(host) if views is None else views
                values = {i: views[i].to(self.device, non_blocking=True, copy=True) for i in segs}
                fresh = list(values.values())
        uploaded = torch.cuda.Event()
        uploaded.record(self.upload)
        for tensor in fresh:
            tensor.record_stream(self.stream)  # allocated on the upload stream, used and freed on ours
        return Pushed(values, whole, uploaded)

    def order_after_upload(self, pushed: Pushed) -> None:
        if pushed.uploaded is not None:
            self.stream.wait_event(pushed.uploaded)

    def _download(self, state: BlockState, segs: list[int], host: torch.Tensor) -> None:
        """Queue on our stream the copies of the values of ``segs`` into ``host`` (pinned, laid out
        like the block): one copy for a whole block."""
        if state.covers(segs):
            host.copy_(state.flat, non_blocking=True)
            return
        views = state.split(host)
        for i in segs:
            views[i].copy_(state.params[i], non_blocking=True)

    def send_values(self, state: BlockState, pending: Pending, head: bytes, on_sent: OnSent) -> None:
        """Copy the values to the block's pinned reply buffer (unless this version is there already)
        and queue the reply; it goes on the wire once the copy has finished."""
        if pending.codecs:
            self._send_encoded(state, pending, head, on_sent)
            return
        stale = [i for i in pending.segs if state.staged[i] != state.version]
        if stale:
            if state.queued_replies:
                self.flush(wait=True)
            if state.reply.busy():
                # a reader has not taken an earlier reply out of it (a stopped worker, a half-open
                # connection): never wait for it; that reply keeps the old buffer alive
                state.reply = Staging(state.block.nbytes)
                state.forget_staged()
                stale = pending.segs
            else:
                state.reply.wait()  # nothing reads it: forget the finished sends
            self._download(state, stale, state.reply.typed(state.flat.dtype, 0, state.block.numel))
            for i in stale:
                state.staged[i] = state.version
        frames = [head] + [state.reply.view(state.byte_offset(i), state.nbytes[i]) for i in pending.segs]
        state.queued_replies += 1
        self._queue(self._work_so_far(), pending.peer, frames, state, on_sent)

    def _send_encoded(self, state: BlockState, pending: Pending, head: bytes, on_sent: OnSent) -> None:
        """Rounded values: encoded on our stream once per version (``BlockState.encoded``), copied into
        fresh pinned buffers, not the reply cache."""
        frames = [head]
        with torch.cuda.stream(self.stream):
            for i, codec in pending.segment_codecs():
                payload = state.params[i].view(torch.uint8) if codec is None else state.encoded(i, codec)
                host = torch.empty(payload.numel(), dtype=torch.uint8, pin_memory=True)
                host.copy_(payload, non_blocking=True)
                frames.append(byte_view(host))
        self._queue(self._work_so_far(), pending.peer, frames, None, on_sent)

    def values_into(self, state: BlockState, segs: list[int], host: torch.Tensor,
                    done: Optional[torch.cuda.Event] = None) -> torch.cuda.Event:
        self._download(state, segs, host)
        return self._work_so_far(done)

    def _work_so_far(self, done: Optional[torch.cuda.Event] = None) -> torch.cuda.Event:
        done = torch.cuda.Event() if done is None else done
        done.record(self.stream)
        return done

    def answer(self, peer: bytes, frames: list, after: Optional[torch.cuda.Event] = None) -> None:
        if after is None:
            self.data.send(frames, peer=peer)
        else:
            self._queue(after, peer, frames, None, None)

    def _queue(self, after: torch.cuda.Event, peer: bytes, frames: list, state: Optional[BlockState],
               on_sent: Optional[OnSent]) -> None:
        self._outbox.append((after, peer, frames, state, on_sent, self.tracer.now_us()))

    def flush(self, wait: bool) -> None:
        while self._outbox:
            done, peer, frames, state, on_sent, queued_us = self._outbox[0]
            if not wait and not done.query():
                return
            done.synchronize()
            self._outbox.popleft()
            tracker = self.data.send(frames, peer=peer, track=True)
            self.tracer.complete("answer waited for the device", queued_us, "answer")
            if state is not None:
                state.queued_replies -= 1
                state.reply.sent(tracker)
            if on_sent is not None:
                on_sent(tracker)

    @property
    def waiting(self) -> bool:
        return bool(self._outbox)

    def close(self) -> None:
        self._outbox.clear()


def _same_gpu(a: torch.device, b: torch.device) -> bool:
    index = torch.cuda.current_device
    return a.type == b.type == "cuda" and (a.index if a.index is not None else index()) == (
        b.index if b.index is not None else index())


def device_io(data: Socket, device: torch.device, tracer: Optional[Tracer] = None) -> DeviceIO:
    return CudaIO(data, device, tracer) if device.type == "cuda" else HostIO(data)


__all__ = ["CudaIO", "DeviceIO", "HostIO", "device_io"]
