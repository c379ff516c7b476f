"""Shared-memory lanes: the data path between a worker and a server on the same host.

Over loopback TCP every byte is copied by the kernel twice each way and by ZeroMQ's I/O threads;
between two processes of one host that is wasted work. A lane is an anonymous memory file
(``memfd_create``) that the worker creates and both map: one *push area* and one *pull area*, each
with a fixed slot for every block the server holds. A push writes the gradient into the block's
push slot and sends only the header; the server reads the slot (on a GPU: one DMA copy, since both
sides register the lane as pinned memory) and writes the new values into the pull slot before it
answers. On one host with GPUs no CPU copies a tensor's bytes at all.

A block's slots belong to one request at a time: the worker reserves them when a request starts
and frees them when its reply has been consumed; a request whose block is still reserved simply
goes over the wire. A lane is attached after ``register`` with an ``attach`` request that names the
worker's descriptor of the file (``/proc/PID/fd/N``, which only the same user can open) and a
random token written at its start: a server on another host cannot open it or reads another token,
and the worker then keeps using the wire. The file never has a name in ``/dev/shm``, so nothing is
left behind whichever process dies at whatever moment; lane files of the old named kind that dead
processes left in ``/dev/shm`` are removed when a worker creates its lanes.

The rows of embedding tables go through a lane too, when the job has tables: two more "blocks"
of ``row_bytes`` each (``row_areas``), one for pulls (the ids in its push slot, the rows answered
in its pull slot) and one for pushes (ids and gradients in its push slot), so that a prefetch
waiting on the server does not keep the step's push off the lane. Each holds one request at a
time; a request that does not fit, or finds its area held, goes over the wire.

>>> lane_layout([(3, 100), (7, 8)])
({3: 0, 7: 128}, 192)
>>> lane_layout([(0, 100)] + row_areas(256))[0]
{-2: 0, -1: 256, 0: 512}
"""

from __future__ import annotations

import logging
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from ..config import MAX_ROW_LANE_BYTES
from ..errors import ConfigError

log = logging.getLogger("psframework.shm")

SHM_DIR = Path("/dev/shm")  # where lane files of the old, named kind may have been left
HEADER_BYTES = 4096  # the token, then page-aligned areas
LANE_PATH = re.compile(r"/proc/\d+/fd/\d+")
_STALE_NAME = re.compile(r"psf-(\d+)-")
TOKEN_BYTES = 16
_ALIGN = 64


ROW_PULLS, ROW_PUSHES = -1, -2  # the row areas' places among a lane's blocks


def aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def row_areas(row_bytes: int) -> list[tuple[int, int]]:
    """The row areas of a lane (none for ``row_bytes`` 0), as (block_id, nbytes) pairs."""
    return [(ROW_PULLS, row_bytes), (ROW_PUSHES, row_bytes)] if row_bytes > 0 else []


def fits_row_area(sizes: Iterable[int], row_bytes: int) -> bool:
    """Whether pieces of these sizes, one after another, fit in a row area of ``row_bytes``."""
    return sum(aligned(n) for n in sizes) <= row_bytes


class RowCursor:
    """Consecutive pieces of a row area's slot (``Slots.push_slot`` or ``pull_slot``), each aligned,
    never beyond the area's ``row_bytes``."""

    def __init__(self, slot, block_id: int, row_bytes: int):
        self._slot, self._block_id, self._limit = slot, block_id, row_bytes
        self.offset = 0

    def take(self, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        if self.offset + nbytes > self._limit:
            raise ConfigError(f"a row request needs more than the lane's row area of {self._limit} bytes")
        piece = self._slot(self._block_id, self.offset, nbytes)
        self.offset += aligned(nbytes)
        return piece.view(dtype)


def lane_layout(blocks: Iterable[tuple[int, int]]) -> tuple[dict[int, int], int]:
    """Offsets of each block's slot within an area, from (block_id, nbytes) pairs in block order,
    and the area's size. Worker and server compute it alike from the shard map."""
    offsets, total = {}, 0
    for block_id, nbytes in sorted(blocks):
        offsets[block_id] = total
        total += aligned(nbytes)
    return offsets, total


def shm_available() -> bool:
    return hasattr(os, "memfd_create") and Path(f"/proc/{os.getpid()}/fd").is_dir()


def remove_stale_lane_files() -> list[Path]:
    """Remove the named lane files (``/dev/shm/psf-PID-*``, made by earlier versions) of processes
    that no longer exist; returns what was removed."""
    removed = []
    for path in SHM_DIR.glob("psf-*") if SHM_DIR.is_dir() else ():
        match = _STALE_NAME.match(path.name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def create_mapped(name: str, size: int) -> tuple[int, Path, torch.Tensor]:
    """A new anonymous memory file of ``size`` bytes with a random token at its start, mapped:
    its descriptor, the path another process of this user opens it by, and the mapping. OSError
    if the memory is not there."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        # reserve the pages now: touching an unbacked page of a full tmpfs is SIGBUS, not an error
        os.posix_fallocate(fd, 0, size)
        path = Path(f"/proc/{os.getpid()}/fd/{fd}")
        memory = torch.from_file(str(path), shared=True, size=size, dtype=torch.uint8)
    except BaseException:
        os.close(fd)
        raise
    memory[:TOKEN_BYTES].copy_(torch.frombuffer(bytearray(secrets.token_bytes(TOKEN_BYTES)), dtype=torch.uint8))
    return fd, path, memory


def map_checked(path: str, size: int, token: bytes, what: str) -> torch.Tensor:
    """Map another process's file (``/proc/PID/fd/N``), checking its size and token."""
    if not LANE_PATH.fullmatch(path):
        raise ConfigError(f"{what} {path!r} is not a psframework process's file (/proc/PID/fd/N)")
    actual = Path(path).stat().st_size
    if actual != size:
        raise ConfigError(f"{what} {path} has {actual} bytes, the shard map needs {size}")
    memory = torch.from_file(path, shared=True, size=size, dtype=torch.uint8)
    if bytes(memory[:TOKEN_BYTES].numpy()) != token:
        raise ConfigError(f"{what} {path} holds another token: not the file offered (another host?)")
    return memory


class Slots:
    """A push slot and a pull slot for every block, in one buffer (a lane file, or GPU memory), and
    which blocks a request holds. Subclasses say where the areas start (``_base``)."""

    on_device = False  # the slots are in GPU memory (``cuda_ipc.DeviceLane``)
    _base = 0

    def __init__(self, memory: torch.Tensor, offsets: dict[int, int], area_bytes: int):
        self.memory = memory  # uint8, the whole buffer
        self.offsets = offsets
        self.area_bytes = area_bytes
        # blocks whose slots a request holds: None while it is in flight, then the events of the
        # copies out of the pull slot (copies onto a GPU may still be reading it)
        self._reserved: dict[int, Optional[list]] = {}
        self._pieces: dict[tuple, torch.Tensor] = {}  # typed views of the slots, made once
        self._views: dict[tuple, tuple] = {}  # slots split by segment, made once (``views``)

    def piece(self, pull: bool, block_id: int, byte_offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """Part of a block's pull (or push) slot as a typed tensor: the same view every step (making
        the views anew cost a worker tens of microseconds per tensor per step)."""
        key = (pull, block_id, byte_offset, nbytes, dtype)
        view = self._pieces.get(key)
        if view is None:
            slot = self.pull_slot if pull else self.push_slot
            view = self._pieces[key] = slot(block_id, byte_offset, nbytes).view(dtype)
        return view

    def views(self, pull: bool, block_id: int, of: tuple, make: Callable[[], dict]) -> dict:
        """What ``make`` splits a block's slot into, made once rather than on every request (a view
        per tensor of a block of many), for as long as the objects in ``of`` (the slot, the block's
        layout) are the same ones. Callers must not change the dict."""
        kept = self._views.get((pull, block_id))
        if kept is None or len(kept[0]) != len(of) or any(a is not b for a, b in zip(kept[0], of)):
            kept = self._views[(pull, block_id)] = (of, make())
        return kept[1]

    def reserve(self, block_id: int) -> bool:
        """Take a block's slots for one request; False while another request holds them."""
        if block_id in self._reserved:
            copied = self._reserved[block_id]
            if copied is None:
                return False
            for event in copied:
                event.synchronize()  # device copies out of the pull slot: nearly always done already
        self._reserved[block_id] = None
        return True

    def release(self, block_id: int, copied: Optional[list] = None) -> None:
        """The request on this block is answered; ``copied``: events of device copies that may
        still read its pull slot."""
        if not copied:
            self._reserved.pop(block_id, None)
        else:
            self._reserved[block_id] = copied

    def copy_push_area(self, other: "Slots") -> None:
        """Take over another buffer's push area (a restarted server gets a fresh one, same contents)."""
        self.memory[self._base:self._base + self.area_bytes].copy_(
            other.memory[other._base:other._base + other.area_bytes])
        self._reserved = dict(other._reserved)

    def forget_memory(self) -> None:
        """Drop our references to the buffer (the views too), so that it can be freed."""
        self.memory = torch.empty(0, dtype=torch.uint8)
        self._pieces.clear()
        self._views.clear()

    def push_slot(self, block_id: int, byte_offset: int, nbytes: int) -> torch.Tensor:
        start = self._base + self.offsets[block_id] + byte_offset
        return self.memory[start:start + nbytes]

    def pull_slot(self, block_id: int, byte_offset: int, nbytes: int) -> torch.Tensor:
        start = self._base + self.area_bytes + self.offsets[block_id] + byte_offset
        return self.memory[start:start + nbytes]


class Lane(Slots):
    """One worker's shared-memory lane to one server: the mapped file, and where each block's slots are."""

    _base = HEADER_BYTES

    def __init__(self, path: Path, memory: torch.Tensor, offsets: dict[int, int], area_bytes: int,
                 fd: Optional[int] = None, row_bytes: int = 0):
        super().__init__(memory, offsets, area_bytes)
        self.row_bytes = row_bytes  # of each row area (0: none; rows of tables go over the wire)
        self.path = path  # where the other side opens the file: the creator's descriptor of it
        self.fd = fd  # the creator's descriptor, kept until the server has mapped the file
        self._registered = False

    @classmethod
    def create(cls, name: str, blocks: Iterable[tuple[int, int]], row_bytes: int = 0) -> "Lane":
        """Create and map a new lane file (the worker's side); OSError if the memory is not there."""
        offsets, area = lane_layout([*blocks, *row_areas(row_bytes)])
        fd, path, memory = create_mapped(name, HEADER_BYTES + 2 * area)
        return cls(path, memory, offsets, area, fd=fd, row_bytes=row_bytes)

    @classmethod
    def attach(cls, path: str, token: bytes, blocks: Iterable[tuple[int, int]], row_bytes: int = 0) -> "Lane":
        """Map a worker's lane (the server's side), checking its size and token."""
        if not 0 <= row_bytes <= MAX_ROW_LANE_BYTES:
            raise ConfigError(f"a lane's row areas of {row_bytes} bytes (at most {MAX_ROW_LANE_BYTES})")
        offsets, area = lane_layout([*blocks, *row_areas(row_bytes)])
        memory = map_checked(path, HEADER_BYTES + 2 * area, token, "lane")
        return cls(Path(path), memory, offsets, area, row_bytes=row_bytes)

    def row_cursor(self, block_id: int, pull_slot: bool = False) -> RowCursor:
        """Pieces of a row area (``ROW_PULLS`` or ``ROW_PUSHES``), in its push or pull slot."""
        return RowCursor(self.pull_slot if pull_slot else self.push_slot, block_id, self.row_bytes)

    def mapped(self) -> None:
        """The other side has mapped the file: our descriptor is no longer needed (the mappings keep it)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @property
    def token(self) -> bytes:
        return bytes(self.memory[:TOKEN_BYTES].numpy())

    @property
    def pinned(self) -> bool:
        return self._registered

    def pin(self, device: Optional[torch.device] = None) -> bool:
        """Register the mapping with CUDA so copies to and from the device are asynchronous DMA."""
        if self._registered or not torch.cuda.is_available():
            return self._registered
        with torch.cuda.device(device if device is not None else torch.cuda.current_device()):
            # 1 = cudaHostRegisterPortable: pinned for every CUDA context of the process
            error = torch.cuda.cudart().cudaHostRegister(self.memory.data_ptr(), self.memory.numel(), 1)
        self._registered = int(error) == 0
        if not self._registered:
            log.warning("could not pin lane %s (cudaHostRegister: %s); its copies will be synchronous",
                        self.path, error)
        return self._registered

    def close(self) -> None:
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.memory.data_ptr())
            self._registered = False
        self.forget_memory()
        self.mapped()


def lane_name(rank: int, server: int) -> str:
    return f"psf-{os.getpid()}-w{rank}-s{server}-{secrets.token_hex(4)}"


__all__ = ["Lane", "ROW_PULLS", "ROW_PUSHES", "RowCursor", "Slots", "aligned", "create_mapped", "fits_row_area", "lane_layout",
           "lane_name", "map_checked", "remove_stale_lane_files", "row_areas", "shm_available"]
