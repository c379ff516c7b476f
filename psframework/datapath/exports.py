"""A worker's GPU allocations that a GPU server of its host maps, to read and write its tensors where they lie.

The plan and its reasons are in ``docs/direct-device-exchange.md``: a server that steps by a
worker's gradients where they lie and copies its values straight into the worker's tensors makes
two passes over them in its own context, where the device lanes make four in two contexts. This
module is its memory: the worker exports whole allocations (each ``cudaMalloc`` of torch's caching
allocator, which keeps them for the life of the process and hands their blocks out again), so a
model's parameters and every step's gradients lie in a few of them, each mapped once.

``WorkerExports`` (the worker's side) says where a tensor lies: an export id and a byte offset,
with the export's handle the first time a server is told of it. An allocation freed and made again
at the same address has another buffer id: it is a new export, and the old id is listed as gone.
``MappedExports`` (the server's side, one per worker) opens the handles it is given and makes
views of the regions a request names, checked against the export's size.

Not wired into the exchanges yet; ``tests/integration/test_exports.py`` (GPU) checks both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from .memops import MemOps


@dataclass(frozen=True)
class Export:
    id: int
    base: int
    size: int
    buffer_id: int
    handle: bytes


@dataclass(frozen=True)
class Located:
    """Where a tensor's data lies: in export ``export``, ``offset`` bytes from its start."""
    export: Export
    offset: int


class WorkerExports:
    """The allocations of this process that servers were told of, and which of them each knows."""

    def __init__(self, ops: MemOps):
        self._ops = ops
        self._by_base: dict[int, Export] = {}
        self._refused: set[tuple[int, int]] = set()  # (base, buffer id) the driver cannot export
        self._next_id = 1
        self._known_by: dict[int, set[int]] = {}  # server rank -> export ids it was given
        self._gone: list[int] = []  # ids replaced since the servers last heard

    def locate(self, tensor: torch.Tensor) -> Optional[Located]:
        """Where ``tensor`` (contiguous, on a GPU) lies; None where the driver cannot say or cannot
        export its allocation (then it goes through the device lane)."""
        address = tensor.data_ptr()
        if tensor.numel() == 0 or address == 0:
            return None
        try:
            base, size, buffer_id = self._ops.allocation_of(address)
        except ConfigError:
            return None
        if (base, buffer_id) in self._refused:
            return None
        export = self._by_base.get(base)
        if export is None or export.buffer_id != buffer_id or export.size != size:
            if export is not None:
                self._mark_gone(export)
            try:
                handle = self._ops.ipc_handle(base)
            except ConfigError:
                self._refused.add((base, buffer_id))
                return None
            export = self._by_base[base] = Export(self._next_id, base, size, buffer_id, handle)
            self._next_id += 1
        if address + tensor.numel() * tensor.element_size() > base + size:
            raise ConfigError(f"a tensor of {tensor.numel()} elements at {address:#x} runs past its "
                              f"allocation ({size} bytes at {base:#x})")
        return Located(export, address - base)

    def sweep(self) -> None:
        """Find the exported allocations that were freed (``torch.cuda.empty_cache()``, or the
        allocator's retry after running out of memory), wherever the next one lands; the servers
        hear of them with ``take_gone``."""
        for export in list(self._by_base.values()):
            try:
                _, _, buffer_id = self._ops.allocation_of(export.base)
            except ConfigError:
                buffer_id = None
            if buffer_id != export.buffer_id:
                self._mark_gone(export)

    def _mark_gone(self, export: Export) -> None:
        self._by_base.pop(export.base, None)
        if any(export.id in known for known in self._known_by.values()):
            self._gone.append(export.id)

    def introductions(self, server: int, located: list[Located]) -> list[tuple[int, bytes, int]]:
        """(id, handle, size) of the exports among ``located`` that ``server`` was not told of yet;
        they count as told from now on."""
        known = self._known_by.setdefault(server, set())
        fresh = {item.export.id: item.export for item in located if item.export.id not in known}
        known.update(fresh)
        return [(export.id, export.handle, export.size) for export in fresh.values()]

    def take_gone(self, server: int) -> list[int]:
        """The ids ``server`` knows that were replaced since; forgotten for it from now on."""
        known = self._known_by.get(server, set())
        gone = [export_id for export_id in self._gone if export_id in known]
        known.difference_update(gone)
        self._gone = [export_id for export_id in self._gone
                      if any(export_id in ids for ids in self._known_by.values())]
        return gone

    def forget_server(self, server: int) -> None:
        """A restarted server knows none of our exports."""
        self._known_by.pop(server, None)
        self._gone = [export_id for export_id in self._gone
                      if any(export_id in ids for ids in self._known_by.values())]


class _DeviceMemory:
    """A mapped region as an object torch can view (``__cuda_array_interface__``, no stream)."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None, "stream": None}


def _mapped_bytes(ops: MemOps, address: int, claimed: int) -> int:
    """The size of what ``open_handle`` mapped at ``address``, where the driver says (else ``claimed``:
    the worker is a member of the job, and a view past the mapping would fault the server's context)."""
    try:
        return ops.allocation_of(address)[1]
    except ConfigError:
        return claimed


class MappedExports:
    """One worker's exports that this server opened, on ``device``."""

    def __init__(self, ops: MemOps, device: torch.device, worker: int):
        self._ops, self._device, self._worker = ops, device, worker
        self._open: dict[int, tuple[int, torch.Tensor]] = {}  # id -> (address here, bytes as uint8)

    def introduce(self, export_id: int, handle: bytes, size: int) -> None:
        """Open an export the worker just told us of (replacing one of the same id); ``ConfigError``
        if the driver cannot, or if what it maps is smaller than the worker said."""
        self.forget([export_id])
        torch.cuda.synchronize(self._device)  # the device's context current on this thread, for the driver
        with torch.cuda.device(self._device):
            address = self._ops.open_handle(handle)
            try:
                if _mapped_bytes(self._ops, address, size) < size:
                    raise ConfigError(f"worker {self._worker}'s export {export_id} maps fewer bytes here "
                                      f"than the {size} it said")
                memory = torch.as_tensor(_DeviceMemory(address, size), device=self._device)
                if memory.data_ptr() != address or memory.device != self._device:
                    raise ConfigError(f"worker {self._worker}'s export {export_id}: torch made a copy of it on "
                                      f"{memory.device} instead of a view")
            except BaseException:
                self._ops.close_handle(address)
                raise
        self._open[export_id] = (address, memory)

    def view(self, export_id: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at ``offset`` bytes into export ``export_id``."""
        opened = self._open.get(export_id)
        if opened is None:
            raise ConfigError(f"worker {self._worker} named export {export_id}, which it never introduced "
                              "(or which is gone); restart the worker")
        memory = opened[1]
        nbytes = numel * dtype.itemsize
        if numel < 0 or offset < 0 or offset % dtype.itemsize or offset + nbytes > memory.numel():
            raise ConfigError(f"worker {self._worker} named {numel} elements of {dtype} at byte {offset} of "
                              f"export {export_id}, which has {memory.numel()} bytes")
        return memory[offset:offset + nbytes].view(dtype)

    def forget(self, export_ids: list[int]) -> None:
        """Unmap these exports, once the device is done with what was queued on their views."""
        opened = [self._open.pop(export_id) for export_id in export_ids if export_id in self._open]
        if opened:
            torch.cuda.synchronize(self._device)
        for address, _ in opened:
            self._ops.close_handle(address)

    def close(self) -> None:
        """Unmap everything (the worker left or died)."""
        self.forget(list(self._open))

    def __len__(self) -> int:
        return len(self._open)


__all__ = ["Export", "Located", "MappedExports", "WorkerExports"]
