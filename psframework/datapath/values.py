"""A server's values in shared memory: one copy of each block that every worker of its host reads.

Through lanes alone, a sync step of W workers on one host makes the server write every block's new
values W times, once into each worker's pull slot, and each worker then copies them out again. With
shared values the blocks themselves live in an anonymous memory file (``memfd_create``) that the
server creates and the workers of its host map: the optimizer updates them in place, and a lane
answer that says ``shared`` carries no values at all; the worker copies the block straight out of
the server's memory. The server offers the file in its answer to a worker's lane (``Attached``),
by its own descriptor (``/proc/PID/fd/N``) and a random token written at its start, exactly as a
worker offers its lane.

Every block has a sequence number in the file's header (a seqlock): odd while the server writes
the block, even when it is done. A reader takes the number, copies, and takes it again; equal and
even means the copy holds one version of the block, otherwise it copies again. In sync mode a
block can only change while a worker reads it if that worker already pushed the next step of it,
so readers practically never retry; async and ssp answer through the pull slots instead, where the
server writes between its updates.

The header's numbers are written and read as whole aligned 64-bit words (numpy scalars), each a
separate load or store, with no memory fence: on x86, where every core sees another's stores in
the order they were made, that orders the numbers and the values as the protocol needs. Servers
elsewhere (ARM) answer through the pull slots (``ordered_stores``).

A read holds one version of the block, at least the one the answer named; it may be a newer one
if the worker already pushed the next step of the block (over the socket, its lane slot busy).
"""

from __future__ import annotations

import os
import platform
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import torch

from ..errors import PSError
from .lane import TOKEN_BYTES, create_mapped, lane_layout, map_checked

_PAGE = 4096
READ_DEADLINE = 5.0  # seconds a reader keeps trying before it says the block never held still


def ordered_stores() -> bool:
    """Whether this CPU shows every core's stores to the others in program order (x86)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _header_bytes(num_blocks: int) -> int:
    return (TOKEN_BYTES + 8 * num_blocks + 8 + _PAGE - 1) // _PAGE * _PAGE


def _file_bytes(blocks: list[tuple[int, int]]) -> int:
    """The size of a values file: the header, then every block's region."""
    return _header_bytes(len(blocks)) + lane_layout(blocks)[1]


class SharedValues:
    """The mapped file of a server's block values, with each block's region and sequence number."""

    def __init__(self, path: Path, memory: torch.Tensor, blocks: list[tuple[int, int]], fd: Optional[int] = None):
        self.path = path  # where the workers open it: the server's descriptor of it
        self.fd = fd  # the server's descriptor, kept while workers may still open it
        self.memory = memory
        self.offsets = lane_layout(blocks)[0]
        self.index = {block_id: i for i, (block_id, _) in enumerate(sorted(blocks))}
        self._base = _header_bytes(len(blocks))
        # one int64 per block, 8-byte aligned after the token
        self.seq = memory[8 * ((TOKEN_BYTES + 7) // 8):][:8 * len(blocks)].view(torch.int64)
        self._words = self.seq.numpy()  # the same numbers: one aligned load or store each, without torch's overhead
        self._pieces: dict[tuple, torch.Tensor] = {}  # typed views of the regions, made once

    @classmethod
    def create(cls, name: str, blocks: Iterable[tuple[int, int]]) -> "SharedValues":
        """Create and map a new file (the server's side); OSError if the memory is not there."""
        blocks = sorted(blocks)
        fd, path, memory = create_mapped(name, _file_bytes(blocks))
        return cls(path, memory, blocks, fd=fd)

    @classmethod
    def attach(cls, path: str, token: bytes, blocks: Iterable[tuple[int, int]]) -> "SharedValues":
        """Map a server's file (a worker's side), checking its size and token."""
        blocks = sorted(blocks)
        return cls(Path(path), map_checked(path, _file_bytes(blocks), token, "shared values"), blocks)

    @property
    def token(self) -> bytes:
        return bytes(self.memory[:TOKEN_BYTES].numpy())

    def slot(self, block_id: int, byte_offset: int, nbytes: int) -> torch.Tensor:
        """Bytes of a block's values (like a lane's ``pull_slot``)."""
        start = self._base + self.offsets[block_id] + byte_offset
        return self.memory[start:start + nbytes]

    def piece(self, block_id: int, byte_offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        """``slot`` as a typed tensor, the same view every step (a reader copies out of it each step)."""
        key = (block_id, byte_offset, nbytes, dtype)
        view = self._pieces.get(key)
        if view is None:
            view = self._pieces[key] = self.slot(block_id, byte_offset, nbytes).view(dtype)
        return view

    # -- the server writes -----------------------------------------------------------------

    @contextmanager
    def writing(self, block_ids: Iterable[int]) -> Iterator[None]:
        """The blocks change inside: their numbers are odd meanwhile, and even (one more version) after."""
        words, index = self._words, [self.index[b] for b in block_ids]
        for i in index:
            words[i] += 1
        try:
            yield
        finally:
            for i in index:
                words[i] += 1

    # -- a worker reads --------------------------------------------------------------------

    def read(self, block_id: int, copy: Callable[[], None], deadline: float = READ_DEADLINE) -> None:
        """Run ``copy()`` (copies out of the block's region) until it saw one version of the block;
        ``PSError`` if the block never held still for ``deadline`` seconds."""
        words, i = self._words, self.index[block_id]
        give_up = time.monotonic() + deadline
        while True:
            before = int(words[i])
            if before % 2 == 0:
                copy()
                if int(words[i]) == before:
                    return
            if time.monotonic() > give_up:
                raise PSError(f"block {block_id} kept changing for {deadline:.0f} s while this worker read it "
                              f"from {self.path} (its server died in an update, or it rewrites the block "
                              "without pause); pull it again")
            time.sleep(0)

    def close(self) -> None:
        self.memory = torch.empty(0, dtype=torch.uint8)
        self._pieces.clear()
        self.seq = torch.empty(0, dtype=torch.int64)
        self._words = self.seq.numpy()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def values_name(server: int) -> str:
    return f"psf-{os.getpid()}-values-s{server}-{secrets.token_hex(4)}"


__all__ = ["READ_DEADLINE", "SharedValues", "ordered_stores", "values_name"]
