"""Which blocks a worker exchanges with a server of its host where its tensors lie (the direct exchange).

A ``PushPull`` of a whole block through a lane whose gradients, and whose destination, each lie in
one region of memory that the block's server has mapped (``datapath/exports.py``) names those
regions in its header: the server steps by the gradients where they lie and writes its values
straight into the destination, and the lane's slots carry nothing. Host tensors qualify when
``shared_empty`` made them (memory files), GPU tensors when the driver can export their allocation
and the server said at attach that it can map ours. Every other block goes through the lane as
before. See ``docs/direct-device-exchange.md``.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..datapath.exports import Located, SharedHostMemory, WorkerExports
from ..datapath.memops import memops
from ..errors import ConfigError

log = logging.getLogger("psframework.worker")


# (server, on a GPU, [(id, handle, size)], ids gone, answered) -> the future of the server's answer;
# ``answered`` gets the ids it cannot map, or None and whether it took the message if no answer
# came (``WorkerLanes``' ``map_exports``)
Introduce = Callable[[int, bool, list, list, Callable[..., None]], Any]

MAX_PLACED = 4096  # placements remembered; more (a loop of ever new tensors) starts afresh


def _where(piece: torch.Tensor) -> tuple[int, int, torch.dtype]:
    return piece.data_ptr(), piece.numel(), piece.dtype


def _nbytes(pieces: list[torch.Tensor]) -> int:
    return sum(piece.numel() * piece.element_size() for piece in pieces)


@dataclass(frozen=True)
class Regions:
    """What a direct request's header carries (``BlockRequest.direct``, ``exports``, ``gone``)."""
    direct: list[int]
    exports: list[tuple[int, bytes, int]]
    gone: list[int]

    @property
    def writes(self) -> bool:
        """The server writes the values into the destination itself."""
        return len(self.direct) == 4

    def fields(self) -> dict:
        return {"direct": self.direct, "exports": self.exports, "gone": self.gone}


def one_region(pieces: list[torch.Tensor]) -> Optional[torch.Tensor]:
    """The first of ``pieces`` if they lie one after another in memory, in order, each contiguous
    and of one dtype and device (a block's segments, then one region); else None."""
    first = pieces[0]
    end = first.data_ptr()
    for piece in pieces:
        if not piece.is_contiguous() or piece.dtype != first.dtype or piece.device != first.device \
                or piece.data_ptr() != end:
            return None
        end += piece.numel() * piece.element_size()
    return first


class DirectExchange:
    """The worker's exports, host and GPU, and which servers said they map them."""

    def __init__(self, rank: int, enabled: bool = True, on_gpu: bool = False, introduce: Optional[Introduce] = None):
        self.rank, self.enabled, self.on_gpu = rank, enabled, enabled and on_gpu
        self._introduce = introduce  # None: servers map what requests name as they come (no answer awaited)
        self.host_memory = SharedHostMemory()
        self._exports: dict[bool, Optional[WorkerExports]] = {False: WorkerExports(self.host_memory), True: None}
        self._accepted: set[tuple[int, bool]] = set()  # (server, on a GPU) that map our memory
        self.gpu_memory_mapped = False  # whether a server ever said that it maps our GPU memory
        # whether servers may write values into mapped destinations: a server's late answer to a
        # failed exchange then writes them too; DistributedOptimizer allows it only for parameters it
        # moves to new memory after a failed step
        self.write_values = True
        # regions and exports named (or None: not mapped), by where every piece lies: placing a
        # tensor asks the driver; forgotten once an allocation is found gone
        self._placed: dict[tuple, Optional[tuple[list[int], list, list]]] = {}
        self._generations = (0, 0, 0)  # of both exports and of the host memory's frees, when placed

    def shared_empty(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A host tensor that servers of this host may read and write where it lies."""
        return self.host_memory.empty(numel, dtype)

    def device_exports(self) -> Optional[WorkerExports]:
        """The exports of our GPU allocations, if this driver can make them."""
        if self._exports[True] is None and self.on_gpu and memops() is not None:
            self._exports[True] = WorkerExports(memops())
        return self._exports[True]

    def probe(self, memory: torch.Tensor) -> Optional[tuple[bytes, int, int]]:
        """(handle, size, offset) of the allocation of ``memory`` (a device lane, its token at its
        start) for a GPU server to check that it maps our memory (``AttachDevice.probe``)."""
        exports = self.device_exports()
        located = None if exports is None else exports.locate(memory)
        if located is None:
            return None
        return located.export.handle, located.export.size, located.offset

    def answered(self, server: int, on_device: bool, accepted: bool) -> None:
        """A server answered our lane (``on_device``: our device lane): whether it maps our memory.
        A server that answers anew (it restarted) knows none of our exports."""
        exports = self._exports[on_device]
        if exports is not None:
            exports.forget_server(server)
        if accepted and (self.on_gpu if on_device else self.enabled):
            self._accepted.add((server, on_device))
            self.gpu_memory_mapped = self.gpu_memory_mapped or on_device
        else:
            self._accepted.discard((server, on_device))

    def accepted_by_any(self, on_device: bool) -> bool:
        """Whether some server maps our host (``on_device``: GPU) memory."""
        return any(device == on_device for _, device in self._accepted)

    def accepts(self, server: int, on_device: bool) -> bool:
        return (server, on_device) in self._accepted

    def sweep(self) -> None:
        """Before an exchange: find the allocations freed since the last (GPU memory the allocator
        gave back, host memory let go of after a failed step): their servers unmap them."""
        if self._exports[True] is not None and self.accepted_by_any(on_device=True):
            torch.cuda.current_stream().query()  # a thread's first CUDA call makes the device's context current
            self._exports[True].sweep()  # the driver's calls need it: without, every export would look freed
        if self.host_memory.freed != self._generations[2]:
            self._exports[False].sweep()
        generations = (self._exports[False].generation, getattr(self._exports[True], "generation", 0),
                       self.host_memory.freed)
        if generations != self._generations or len(self._placed) > MAX_PLACED:
            self._placed.clear()
            self._generations = generations

    def refused(self, on_device: bool, export_ids: list[int]) -> None:
        """A server could not map these exports: what lies in them goes through the lanes."""
        self._exports[on_device].refuse(export_ids)
        self._placed.clear()

    def untake_gone(self, server: int, on_device: bool, gone: list[int]) -> None:
        """The request that carried these exports gone failed or never left: the next tells again."""
        exports = self._exports[on_device]
        if gone and exports is not None:
            exports.untake_gone(server, gone)

    def free(self, tensors: list[torch.Tensor]) -> None:
        """Let go of shared host tensors (``shared_empty``'s); the servers hear at the next exchange."""
        self.host_memory.free(tensors)

    def regions(self, server: int, on_device: bool, sources: list[torch.Tensor],
                dests: Optional[list[torch.Tensor]]) -> Optional[Regions]:
        """The regions of a block's gradients (``sources``, by segment) and of its destination
        (``dests``) if ``server`` maps them; the gradients' alone where the destination is not
        mapped (or not given); None: the block goes through the lane."""
        if not self.accepts(server, on_device) or any(p.is_cuda != on_device for p in sources):
            return None
        exports = self._exports[on_device]
        mapped_dests = dests if self.write_values and dests and all(p.is_cuda == on_device for p in dests) else None
        key = (on_device, *(_where(p) for p in sources), None, *(_where(p) for p in mapped_dests or ()))
        if key not in self._placed:
            self._placed[key] = self._place(exports, sources, mapped_dests)
        placed = self._placed[key]
        if placed is None:
            return None
        direct, located, named = placed
        self._introduce_new(server, on_device, exports, located)
        if self._introduce is not None and not exports.mapped_by(server, located):
            return None  # through the lane until the server said that it maps them
        # every request names its exports' handles: one resent to a restarted server stands alone
        return Regions(direct, named, exports.take_gone(server))

    def offer(self, server: int, tensors: list[torch.Tensor]) -> list:
        """Introduce the exports ``tensors`` lie in to ``server`` now, if it maps memory of their
        kind (a head start: their blocks go direct from the first exchange once it answered);
        the futures of its answers."""
        futures = []
        for on_device in (False, True):
            exports = self.device_exports() if on_device else self._exports[False]
            kind = [tensor for tensor in tensors if tensor.is_cuda == on_device]
            if kind and exports is not None and self.accepts(server, on_device):
                located = [item for item in (self._locate(exports, [tensor]) for tensor in kind) if item is not None]
                futures.append(self._introduce_new(server, on_device, exports, located))
        return [future for future in futures if future is not None]

    def _introduce_new(self, server: int, on_device: bool, exports: WorkerExports, located: list[Located]):
        """Introduce to ``server`` the exports among ``located`` it neither maps nor is asked about
        (telling it of those gone), without waiting: the future of its answer, if one was asked."""
        fresh = exports.introductions(server, located)
        if not fresh or self._introduce is None:
            return None
        ids, gone = [export_id for export_id, _, _ in fresh], exports.take_gone(server)
        try:
            return self._introduce(server, on_device, fresh, gone,
                                   functools.partial(self._answered_introduction, server, on_device, ids))
        except BaseException:
            exports.withdraw(server, ids)
            exports.untake_gone(server, gone)
            raise

    def _answered_introduction(self, server: int, on_device: bool, ids: list[int], refused: Optional[list[int]],
                               accepted: bool = True) -> None:
        """``server``'s answer to the introduction of ``ids``: those it ``refused`` go through the
        lanes from now on, the others may go direct (None: no answer came; asked again). A server
        that refused the message itself (``accepted`` False) maps none of our memory of that kind."""
        exports = self._exports[on_device]
        if refused is None:
            exports.withdraw(server, ids)
            if not accepted:
                self._accepted.discard((server, on_device))
            return
        exports.confirm(server, [export_id for export_id in ids if export_id not in refused])
        if refused:
            self.refused(on_device, refused)

    def _place(self, exports: WorkerExports, sources: list[torch.Tensor], dests: Optional[list[torch.Tensor]]
               ) -> Optional[tuple[list[int], list[Located], list]]:
        located = [self._locate(exports, sources)]
        if located[0] is None:
            return None
        dest = self._locate(exports, dests) if dests else None
        located += [dest] if dest is not None else []
        named = {item.export.id: (item.export.id, item.export.handle, item.export.size) for item in located}
        return [n for item in located for n in (item.export.id, item.offset)], located, list(named.values())

    def _locate(self, exports: WorkerExports, pieces: list[torch.Tensor]) -> Optional[Located]:
        first = one_region(pieces) if pieces else None
        if first is None:
            return None
        try:
            located = exports.locate(first)
        except ConfigError as exc:  # the driver says the tensor runs past its allocation: not ours to map
            log.debug("worker %d: %s", self.rank, exc)
            return None
        if located is None or located.offset + _nbytes(pieces) > located.export.size:
            return None
        return located

    def close(self) -> None:
        self._accepted.clear()
        self.host_memory.close()


__all__ = ["DirectExchange", "Regions", "one_region"]
