"""A worker's memory that a server of its host maps, to read and write its tensors where they lie.

The plan and its reasons are in ``docs/direct-device-exchange.md``: a server that steps by a
worker's gradients where they lie and writes its values straight into the worker's tensors makes
two passes over them, where the lanes make four (on a GPU, in two contexts). This module is its
memory. On a GPU the worker exports whole allocations (each ``cudaMalloc`` of torch's caching
allocator, which keeps them for the life of the process and hands their blocks out again), so a
model's parameters and every step's gradients lie in a few of them, each mapped once. In host
memory only tensors made by ``SharedHostMemory`` (memory files, as the lanes') can be mapped.

``WorkerExports`` (the worker's side) says where a tensor lies: an export id and a byte offset,
with the export's handle the first time a server is told of it. An allocation freed and made again
at the same address has another buffer id: it is a new export, and the old id is listed as gone.
``MappedExports`` (the server's side, one per worker) opens the handles it is given (``HostOpener``,
``DeviceOpener``) and makes views of the regions a request names, checked against the export's size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from .lane import TOKEN_BYTES, create_mapped, map_checked
from .memops import MemOps

log = logging.getLogger("psframework.exports")


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
        self._asked_by: dict[int, set[int]] = {}  # server rank -> export ids whose introduction awaits its answer
        self._mapped_by: dict[int, set[int]] = {}  # server rank -> export ids it said it maps (``confirm``)
        self._gone: list[int] = []  # ids replaced since the servers last heard
        self.generation = 0  # counts the exports found gone: what was placed before may be stale

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
            except ConfigError as exc:
                log.info("an allocation of %d bytes cannot be exported (%s): what lies in it goes through "
                         "the lanes", size, exc)
                self._refused.add((base, buffer_id))
                return None
            export = self._by_base[base] = Export(self._next_id, base, size, buffer_id, handle)
            self._next_id += 1
        if address + tensor.numel() * tensor.element_size() > base + size:
            raise ConfigError(f"a tensor of {tensor.numel()} elements at {address:#x} runs past its "
                              f"allocation ({size} bytes at {base:#x})")
        return Located(export, address - base)

    def sweep(self) -> bool:
        """Find the exported allocations that were freed (``torch.cuda.empty_cache()``, or the
        allocator's retry after running out of memory), wherever the next one lands; the servers
        hear of them with ``take_gone``. Whether any was."""
        found = False
        for export in list(self._by_base.values()):
            try:
                _, _, buffer_id = self._ops.allocation_of(export.base)
            except ConfigError:
                buffer_id = None
            if buffer_id != export.buffer_id:
                self._mark_gone(export)
                found = True
        return found

    def refuse(self, export_ids: list[int]) -> None:
        """A server could not map these exports: their allocations go through the lanes from now on."""
        for export in [export for export in self._by_base.values() if export.id in export_ids]:
            log.info("a server cannot map export %d (%d bytes): what lies in it goes through the lanes",
                     export.id, export.size)
            self._refused.add((export.base, export.buffer_id))
            self._mark_gone(export)

    def _mark_gone(self, export: Export) -> None:
        self.generation += 1
        self._by_base.pop(export.base, None)
        if any(export.id in known for known in self._known_by.values()):
            self._gone.append(export.id)

    def introductions(self, server: int, located: list[Located]) -> list[tuple[int, bytes, int]]:
        """(id, handle, size) of the exports among ``located`` that ``server`` neither said it maps
        nor is being asked to: they count as told from now on (it hears when they are gone), and
        as asked until ``confirm`` or ``withdraw``."""
        asked, mapped = self._asked_by.setdefault(server, set()), self._mapped_by.get(server, set())
        fresh = {item.export.id: item.export for item in located
                 if item.export.id not in asked and item.export.id not in mapped}
        asked.update(fresh)
        self._known_by.setdefault(server, set()).update(fresh)
        return [(export.id, export.handle, export.size) for export in fresh.values()]

    def confirm(self, server: int, export_ids: list[int]) -> None:
        """``server`` answered their introduction: it maps these exports (those it still knows of:
        it may have restarted since)."""
        self._asked_by.get(server, set()).difference_update(export_ids)
        known = self._known_by.get(server, set())
        self._mapped_by.setdefault(server, set()).update(export_id for export_id in export_ids if export_id in known)

    def withdraw(self, server: int, export_ids: list[int]) -> None:
        """No answer came to their introduction (the worker closed, the job rolled back): they are
        asked again when next placed (and still count as told: the server may have mapped them)."""
        self._asked_by.get(server, set()).difference_update(export_ids)

    def mapped_by(self, server: int, located: list[Located]) -> bool:
        """Whether ``server`` said it maps every export of ``located``."""
        mapped = self._mapped_by.get(server, set())
        return all(item.export.id in mapped for item in located)

    def take_gone(self, server: int) -> list[int]:
        """The ids ``server`` knows that were replaced since; forgotten for it from now on."""
        known = self._known_by.get(server, set())
        gone = [export_id for export_id in self._gone if export_id in known]
        for ids in (known, self._asked_by.get(server, set()), self._mapped_by.get(server, set())):
            ids.difference_update(gone)
        self._gone = [export_id for export_id in self._gone
                      if any(export_id in ids for ids in self._known_by.values())]
        return gone

    def untake_gone(self, server: int, gone: list[int]) -> None:
        """``take_gone``'s ids never reached ``server``: it is told of them with the next."""
        self._known_by.setdefault(server, set()).update(gone)
        self._gone += [export_id for export_id in gone if export_id not in self._gone]

    def forget_server(self, server: int) -> None:
        """A restarted server knows none of our exports."""
        for ids in (self._known_by, self._asked_by, self._mapped_by):
            ids.pop(server, None)
        self._gone = [export_id for export_id in self._gone
                      if any(export_id in ids for ids in self._known_by.values())]


class SharedHostMemory:
    """Host tensors in memory files that servers of this host may map: the host memory of the
    direct exchange. Each ``empty`` is one allocation (a memory file, as the lanes'), kept mapped
    and open until ``close``, so that a server's mapping never outlives the memory; its handle is
    its token and the path another process opens it by. The same calls as the driver's
    (``allocation_of``, ``ipc_handle``), so ``WorkerExports`` places host tensors too."""

    def __init__(self):
        # base -> (descriptor, size, id, handle, mapping); an id is never used twice
        self._files: dict[int, tuple[int, int, int, bytes, torch.Tensor]] = {}
        self._next_id = 1
        self.freed = 0  # allocations let go of (``free``): their exports are gone

    def empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A new tensor of ``numel`` elements of ``dtype`` in a memory file of its own (zeroed);
        OSError if the memory is not there."""
        nbytes = max(numel * dtype.itemsize, 1)
        fd, path, memory = create_mapped(f"psf-{os.getpid()}-export-{self._next_id}", TOKEN_BYTES + nbytes)
        token = bytes(memory[:TOKEN_BYTES].numpy())
        data = memory[TOKEN_BYTES:]
        self._files[data.data_ptr()] = (fd, nbytes, self._next_id, token + str(path).encode(), memory)
        self._next_id += 1
        return data[:numel * dtype.itemsize].view(dtype)

    def allocation_of(self, address: int) -> tuple[int, int, int]:
        """The file ``address`` lies in: its data's base, size, and its id."""
        for base, (_, size, buffer_id, _, _) in self._files.items():
            if base <= address < base + size:
                return base, size, buffer_id
        raise ConfigError(f"host address {address:#x} is not in a shared allocation")

    def ipc_handle(self, base: int) -> bytes:
        return self._files[base][3]

    def free(self, tensors: list[torch.Tensor]) -> None:
        """Let go of the allocations of ``tensors`` (made by ``empty``): their files close, and the
        memory goes back once no tensor of this process or mapping of a server's uses it."""
        for tensor in tensors:
            entry = self._files.pop(tensor.data_ptr(), None) if tensor.numel() else None
            if entry is not None:
                os.close(entry[0])
                self.freed += 1

    def close(self) -> None:
        """Let the files go (their tensors stay valid while referenced; servers keep their mappings)."""
        for fd, *_ in self._files.values():
            os.close(fd)
        self._files.clear()


class HostOpener:
    """A server's side of ``SharedHostMemory``: maps a worker's memory file, checking its token."""

    def open(self, handle: bytes, size: int) -> torch.Tensor:
        """The worker's file as bytes; unmapped once no view of it is left."""
        token, path = handle[:TOKEN_BYTES], handle[TOKEN_BYTES:].decode(errors="replace")
        return map_checked(path, TOKEN_BYTES + size, token, "shared allocation")[TOKEN_BYTES:]


class _DeviceMemory:
    """A mapped region as an object torch can view (``__cuda_array_interface__``, no stream). Every
    view torch makes of it keeps it alive; once the last is gone it unmaps the region (``release``),
    so a view that a sync step still holds never outlives its mapping."""

    def __init__(self, address: int, nbytes: int):
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1", "data": (address, False),
                                         "version": 3, "strides": None, "stream": None}
        self.address, self.release = address, None

    def __del__(self):
        release, self.release = self.release, None
        if release is not None:
            release(self.address)


def _mapped_bytes(ops: MemOps, address: int, claimed: int) -> int:
    """The size of what ``open_handle`` mapped at ``address``, where the driver says (else ``claimed``:
    the worker is a member of the job, and a view past the mapping would fault the server's context)."""
    try:
        return ops.allocation_of(address)[1]
    except ConfigError:
        return claimed


class DeviceOpener:
    """A GPU server's side of a worker's GPU allocations: maps them by CUDA IPC on ``device``."""

    def __init__(self, ops: MemOps, device: torch.device):
        self._ops, self._device = ops, device

    def open(self, handle: bytes, size: int) -> torch.Tensor:
        """The allocation as bytes on our device; unmapped once no view of it is left (``_unmap``)."""
        torch.cuda.synchronize(self._device)  # the device's context current on this thread, for the driver
        with torch.cuda.device(self._device):
            address = self._ops.open_handle(handle)
            try:
                if _mapped_bytes(self._ops, address, size) < size:
                    raise ConfigError(f"maps fewer bytes here than the {size} it said")
                owner = _DeviceMemory(address, size)
                memory = torch.as_tensor(owner, device=self._device)
                if memory.data_ptr() != address or memory.device != self._device:
                    raise ConfigError(f"torch made a copy of it on {memory.device} instead of a view")
            except BaseException:
                self._ops.close_handle(address)
                raise
        owner.release = self._unmap
        return memory

    def _unmap(self, address: int) -> None:
        """The last view of a mapping is gone: unmap it once the work queued on its views is done."""
        try:
            with torch.cuda.device(self._device):
                torch.cuda.synchronize(self._device)
                self._ops.close_handle(address)
        except Exception as exc:  # noqa: BLE001 -- a broken context, or the interpreter's exit: nothing to do
            log.warning("could not unmap a worker's GPU memory at %#x: %s", address, exc)


class MappedExports:
    """One worker's exports that this server opened (with ``opener``: ``HostOpener`` or ``DeviceOpener``)."""

    def __init__(self, opener, worker: int):
        self._opener, self._worker = opener, worker
        self._open: dict[int, torch.Tensor] = {}  # id -> its bytes (uint8): mapped while any view of it lives
        self._views: dict[tuple, torch.Tensor] = {}  # made once: a worker names the same regions every step
        self._splits: dict[tuple, tuple] = {}  # (view, layout, its split) by their ids: see ``split``

    def introduce(self, export_id: int, handle: bytes, size: int) -> None:
        """Open an export the worker just told us of (replacing one of the same id); ``ConfigError``
        if we cannot, or if what it maps is smaller than the worker said."""
        self.forget([export_id])
        try:
            self._open[export_id] = self._opener.open(handle, size)
        except (ConfigError, OSError, RuntimeError) as exc:
            raise ConfigError(f"worker {self._worker}'s export {export_id} ({size} bytes): {exc}") from None

    def view(self, export_id: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """``numel`` elements of ``dtype`` at ``offset`` bytes into export ``export_id``."""
        key = (export_id, offset, numel, dtype)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._view(export_id, offset, numel, dtype)
        return view

    def split(self, view: torch.Tensor, state) -> dict[int, torch.Tensor]:
        """``state.split(view)`` (a view per segment of its block), made once per view and block
        rather than on every request: a block of a hundred tensors took longer to split than to
        step on a GPU."""
        key = (id(view), id(state.block))
        kept = self._splits.get(key)
        if kept is None or kept[0] is not view or kept[1] is not state.block:
            kept = self._splits[key] = (view, state.block, state.split(view))
        return kept[2]

    def _view(self, export_id: int, offset: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        memory = self._open.get(export_id)
        if memory is None:
            raise ConfigError(f"worker {self._worker} named export {export_id}, which it never introduced "
                              "(or which is gone); restart the worker")
        nbytes = numel * dtype.itemsize
        if numel < 0 or offset < 0 or offset % dtype.itemsize or offset + nbytes > memory.numel():
            raise ConfigError(f"worker {self._worker} named {numel} elements of {dtype} at byte {offset} of "
                              f"export {export_id}, which has {memory.numel()} bytes")
        return memory[offset:offset + nbytes].view(dtype)

    def forget(self, export_ids: list[int]) -> None:
        """Let these exports go: each is unmapped once no view of it is left (a sync step that is
        not applied yet may still hold one), after the work queued on its views."""
        if any([self._open.pop(export_id, None) is not None for export_id in export_ids]):
            self._views = {key: view for key, view in self._views.items() if key[0] in self._open}
            self._splits = {}

    def close(self) -> None:
        """Unmap everything (the worker left or died)."""
        self.forget(list(self._open))

    def __len__(self) -> int:
        return len(self._open)

    def __contains__(self, export_id: int) -> bool:
        return export_id in self._open


__all__ = ["DeviceOpener", "Export", "HostOpener", "Located", "MappedExports", "SharedHostMemory", "WorkerExports"]
