"""CUDA IPC lanes: the data path between a GPU worker and a GPU server of the same host.

A shared-memory lane (``lane.py``) still crosses PCIe twice each way: the worker's gradients go
from its GPU into the lane and from the lane onto the server's GPU, and the values come back the
same way. A *device lane* has the same layout, a push slot and a pull slot for every block of the
server, but lives in the worker's GPU memory, and the server maps it by CUDA IPC: the worker copies
its gradients into the push slot device to device, the server copies them out onto its shards and
its new values into the pull slot, device to device (peer to peer where the two GPUs differ), and
the socket carries only headers.

Ordering is by CUDA events that each side records after its own copies and waits for on the host
before it sends the header that tells the other side to read: the worker sends a push once the
event of its copy into the push slot has completed, the server answers once the event of its copy
into the pull slot has completed (the same rule as for lanes in host memory). No side ever queues a
wait for the other process's events on its streams, so a peer that dies or is stopped can never
leave a stream of ours waiting for work that will not come; the price is the few microseconds
between a copy's end and the host seeing it.

A worker offers a device lane only to servers that took its shared-memory lane (which shows they
are on its host) and only where its tensors are on a GPU; the handle travels, with a random token
written at the start of the memory, over the job's authenticated channel to servers the scheduler
admitted. A server that cannot open it (its shards are on the host, the GPUs cannot reach each
other) refuses, and that server's blocks keep using the shared-memory lane. ``PS_CUDA_IPC=0`` turns
device lanes off.
"""

from __future__ import annotations

import secrets
from typing import Iterable

import torch

from .. import protocol as P
from ..errors import ConfigError
from .lane import TOKEN_BYTES, Slots, lane_layout

HEADER_BYTES = 512  # the token, then aligned areas


class DeviceLane(Slots):
    """A worker's lane to one server in GPU memory: made by the worker, mapped by the server."""

    on_device = True
    pinned = True
    _base = HEADER_BYTES

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

    @property
    def token(self) -> bytes:
        return bytes(self.memory[:TOKEN_BYTES].cpu().numpy())

    def mapped(self) -> None:
        """Nothing to let go once the server has mapped it (unlike a lane file's descriptor)."""

    def pin(self, device=None) -> bool:
        return True  # device memory

    def close(self) -> None:
        self.forget_memory()


__all__ = ["HEADER_BYTES", "DeviceLane"]
