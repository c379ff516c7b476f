"""CUDA IPC lanes: the data path between a GPU worker and a GPU server of the same host.

A shared-memory lane (``lane.py``) still crosses PCIe twice each way: the worker's gradients go
from its GPU into the lane and from the lane onto the server's GPU, and the values come back the
same way. A *device lane* has the same layout, a push slot and a pull slot for every block of the
server, but lives in the worker's GPU memory, and the server maps it by CUDA IPC: the worker copies
its gradients into the push slot device to device, the server copies them out onto its shards and
its new values into the pull slot, device to device (peer to peer where the two GPUs differ), and
the socket carries only headers.

Ordering of the values is by CUDA events shared between the processes: the server makes one
interprocess event per block when it maps the lane and sends their handles with its answer to the
lane (``Attached.events``); it records a block's event on its stream after queuing the copy of the
values into the pull slot and answers at once, so the answer travels while the device works. The
worker then waits on the host for that event (``wait_for_peer``, with a liveness check of the job
and a deadline) before it queues its copy out of the pull slot, and checks that the server's
process still runs (a killed process's events read as complete: ``peer_process.py``). No side ever queues a wait for the
other process's event on its streams: a peer killed with work in flight leaves its events
incomplete for ever, and a stream of ours waiting for one could never be freed. The gradients go
the other way as before: the worker sends a push once its copy into the push slot has completed.

A worker offers a device lane only to servers that took its shared-memory lane (which shows they
are on its host) and only where its tensors are on a GPU; the handle travels, with a random token
written at the start of the memory, over the job's authenticated channel to servers the scheduler
admitted. A server that cannot open it (its shards are on the host, the GPUs cannot reach each
other) refuses, and that server's blocks keep using the shared-memory lane. ``PS_CUDA_IPC=0`` turns
device lanes off.
"""

from __future__ import annotations

import secrets
import socket
import time
from typing import Callable, Iterable, Optional

import torch

from .. import protocol as P
from ..errors import ConfigError, PeerLostError, PSError, PSTimeoutError
from .lane import TOKEN_BYTES, Slots, lane_layout
from .peer_process import PeerProcess

HEADER_BYTES = 512  # the token, then aligned areas
PEER_EVENT_DEADLINE = 60.0  # seconds a worker waits for a live server's device work on one block
_LIVENESS_EVERY = 0.05  # seconds between checks that the job's nodes live, while waiting for an event
_SPIN = 0.002  # seconds of waiting for an event without pausing (device work takes microseconds)


class DeviceLane(Slots):
    """A worker's lane to one server in GPU memory: made by the worker, mapped by the server."""

    on_device = True
    pinned = True
    _base = HEADER_BYTES

    def __init__(self, memory: torch.Tensor, offsets: dict[int, int], area_bytes: int):
        super().__init__(memory, offsets, area_bytes)
        # by block: the server records it once the block's values are in the pull slot
        self.written: dict[int, torch.cuda.Event] = {}
        self.server: Optional[PeerProcess] = None  # the server's process (the worker's side)

    @classmethod
    def create(cls, device: torch.device, blocks: Iterable[tuple[int, int]]) -> "DeviceLane":
        """Allocate the lane on the worker's GPU; ``torch.cuda.OutOfMemoryError`` if it does not fit."""
        offsets, area = lane_layout(blocks)
        memory = torch.zeros(HEADER_BYTES + 2 * area, dtype=torch.uint8, device=device)
        token = torch.frombuffer(bytearray(secrets.token_bytes(TOKEN_BYTES)), dtype=torch.uint8)
        memory[:TOKEN_BYTES].copy_(token)
        return cls(memory, offsets, area)

    def export(self, rank: int, req: int) -> P.AttachDevice:
        """What a server needs to map this lane: the request that offers it."""
        (device, handle, size, offset, counter_handle, counter_offset, event_handle,
         event_sync) = self.memory.untyped_storage()._share_cuda_()
        return P.AttachDevice(req=req, rank=rank, token=self.token, device=int(device), handle=bytes(handle),
                              size=int(size), offset=int(offset), counter_handle=bytes(counter_handle),
                              counter_offset=int(counter_offset),
                              event_handle=bytes(event_handle or b""),
                              event_sync=bool(event_sync), nbytes=self.memory.numel())

    @classmethod
    def attach(cls, message: P.AttachDevice, blocks: Iterable[tuple[int, int]],
               device: torch.device) -> "DeviceLane":
        """Map a worker's device lane on our ``device`` (the server's side), checking size and token."""
        offsets, area = lane_layout(blocks)
        expected = HEADER_BYTES + 2 * area
        if message.nbytes != expected:
            raise ConfigError(f"device lane of worker {message.rank} has {message.nbytes} bytes, "
                              f"the shard map needs {expected}")
        storage = torch.UntypedStorage._new_shared_cuda(
            device.index if device.index is not None else torch.cuda.current_device(), message.handle,
            message.size, message.offset, message.counter_handle, message.counter_offset,
            message.event_handle, message.event_sync)
        whole = torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)
        lane = cls(whole[:expected], offsets, area)
        if lane.token != message.token:
            raise ConfigError(f"device lane of worker {message.rank} holds another token")
        return lane

    def make_events(self, device: torch.device) -> list[bytes]:
        """The server's side: one interprocess event per block; their handles, by block id in
        ascending order, for the worker."""
        with torch.cuda.device(device):
            self.written = {block_id: torch.cuda.Event(interprocess=True) for block_id in sorted(self.offsets)}
            return [bytes(event.ipc_handle()) for event in self.written.values()]

    def open_events(self, reply: P.Message, server: int) -> None:
        """The worker's side: open the server's events (``make_events``) and watch its process, once;
        ConfigError, or OSError where its process is not visible from here."""
        events = reply.events if isinstance(reply, P.Attached) else []
        if len(events) != len(self.offsets):
            raise ConfigError(f"server {server} sent {len(events)} events for a device lane of "
                              f"{len(self.offsets)} blocks")
        self.server = PeerProcess(reply.pid, reply.started)
        device = self.memory.device
        self.written = {block_id: torch.cuda.Event.from_ipc_handle(device, handle)
                        for block_id, handle in zip(sorted(self.offsets), events)}

    def wait_written(self, block_id: int, alive: Callable[[], None], server: int) -> Optional[PSError]:
        """Wait until the server's values of ``block_id`` are in the pull slot; the error instead, if
        the server has no event for it, or dies or takes more than PEER_EVENT_DEADLINE."""
        event = self.written.get(block_id)
        if event is None or self.server is None:
            return PSError(f"device lane to server {server}: no event for block {block_id} (the server's "
                           "answer to the lane named none); restart the job")
        try:
            wait_for_peer(event, alive, f"server {server}'s values of block {block_id}")
        except PSError as exc:
            return exc
        if not self.server.running():  # its context went away with the work: the event says nothing
            return PeerLostError(f"server {server} (pid {self.server.pid} on {socket.gethostname()}) died "
                                 f"while writing the values of block {block_id} into the device lane",
                                 role="server", rank=server, host=socket.gethostname())
        return None

    @property
    def token(self) -> bytes:
        return bytes(self.memory[:TOKEN_BYTES].cpu().numpy())

    def mapped(self) -> None:
        """Nothing to let go once the server has mapped it (unlike a lane file's descriptor)."""

    def pin(self, device=None) -> bool:
        return True  # device memory

    def close(self) -> None:
        self.written = {}
        if self.server is not None:
            self.server.close()
        self.forget_memory()


def wait_for_peer(event: torch.cuda.Event, alive: Callable[[], None], what: str,
                  deadline: float = PEER_EVENT_DEADLINE) -> None:
    """Wait on the host until ``event``, recorded by another process, has completed: spinning at
    first, then pausing between looks; ``alive()`` raises if the peer is gone (checked every
    ``_LIVENESS_EVERY``); PSTimeoutError once ``deadline`` seconds have passed."""
    started = time.monotonic()
    next_check = started + _LIVENESS_EVERY
    while not _completed(event, what):
        now = time.monotonic()
        if now < started + _SPIN:
            continue
        if now >= next_check:
            alive()
            next_check = now + _LIVENESS_EVERY
            if now - started > deadline:
                raise PSTimeoutError(f"{what}: the device work has not finished in {deadline:.0f} s; the GPU "
                                     "may be hung (see nvidia-smi)")
        time.sleep(20e-6)


def _completed(event: torch.cuda.Event, what: str) -> bool:
    try:
        return event.query()
    except RuntimeError as exc:  # the CUDA error of a context that went away
        raise PSError(f"{what}: its event failed ({exc})") from None


__all__ = ["HEADER_BYTES", "PEER_EVENT_DEADLINE", "DeviceLane", "wait_for_peer"]
