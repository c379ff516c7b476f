"""Where shards live, and the pinned host buffers that carry GPU tensors to and from the wire.

ZeroMQ sends and receives host memory, so a tensor on a GPU travels through a pinned host buffer
that is allocated once and reused. Reuse is what makes this fast and what makes it delicate: a
buffer may still be read or written by an asynchronous copy to or from the device, or read by a
zero-copy send that ZeroMQ has not finished, so every ``Staging`` remembers what may still touch it,
and ``wait()`` waits for exactly that before the buffer is handed out again.

>>> pick_server_device("cuda", rank=3, addresses=["tcp://a:1", "tcp://b:1", "tcp://a:2", "tcp://a:3"],
...                    gpu_count=2)
'cuda:0'
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import zmq

from .buffers import byte_view
from .config import check_device
from .errors import ConfigError

LivenessCheck = Optional[Callable[[], None]]


def _host_of(address: str) -> str:
    return address.rsplit(":", 1)[0]


def pick_server_device(requested: Optional[str], rank: int, addresses: Sequence[str], gpu_count: int) -> str:
    """The device of server ``rank``: ``cpu``, an explicit ``cuda:N``, or for a bare ``cuda`` (also the
    default where there are GPUs) GPU ``i mod gpu_count``, where ``i`` counts the servers of lower rank
    that advertise the same host, so that the servers of one host spread over its GPUs."""
    if requested is None:
        requested = "cuda" if gpu_count > 0 else "cpu"
    check_device(requested)
    if requested == "cpu":
        return requested
    if gpu_count <= 0:
        raise ConfigError(f"server {rank}: shards on {requested!r} were asked for, but this host has no GPU "
                          "that torch can use")
    if requested != "cuda":
        index = int(requested.split(":", 1)[1])
        if index >= gpu_count:
            raise ConfigError(f"server {rank}: device {requested!r} does not exist, this host has "
                              f"{gpu_count} GPU(s)")
        return requested
    if 0 <= rank < len(addresses):
        mine = _host_of(addresses[rank])
        ordinal = sum(1 for a in addresses[:rank] if _host_of(a) == mine)
    else:
        ordinal = rank
    return f"cuda:{ordinal % gpu_count}"


def init_cuda_early(requested: Optional[str]) -> None:
    """Initialise CUDA now if this process may use it. On a cold machine that takes seconds and
    holds the GIL, so done after joining a job it would starve the heartbeat thread and get the
    process declared dead."""
    if requested != "cpu" and torch.cuda.is_available():
        torch.cuda.init()


def wait_tracker(tracker, check: LivenessCheck = None, slice_s: float = 0.1) -> None:
    """Wait until a zero-copy send has released its memory, asking ``check`` between slices."""
    while not tracker.done:
        if check is not None:
            check()
        try:
            tracker.wait(slice_s)
        except zmq.NotDone:
            pass


class Staging:
    """A reusable pinned host buffer of ``nbytes`` bytes between device memory and the wire."""

    def __init__(self, nbytes: int):
        self.nbytes = nbytes
        # pinned so that copies to and from the device are asynchronous DMA
        self.host = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=True)[:nbytes]
        self._event: Optional[torch.cuda.Event] = None
        self._trackers: list = []

    def typed(self, dtype: torch.dtype, byte_offset: int = 0, numel: Optional[int] = None) -> torch.Tensor:
        """A typed view of the buffer from ``byte_offset`` (``numel`` elements, default: the rest)."""
        size = torch.empty((), dtype=dtype).element_size()
        end = self.nbytes if numel is None else byte_offset + numel * size
        return self.host[byte_offset:end].view(dtype)

    def view(self, byte_offset: int, nbytes: int) -> memoryview:
        return byte_view(self.host[byte_offset:byte_offset + nbytes])

    def copied(self, stream: torch.cuda.Stream) -> None:
        """Record that copies enqueued on ``stream`` so far read or write this buffer."""
        event = torch.cuda.Event()
        event.record(stream)
        self._event = event

    def sent(self, tracker) -> None:
        """Record a zero-copy send that reads this buffer (``None``: the send copied)."""
        if tracker is not None and not tracker.done:
            self._trackers.append(tracker)

    def busy(self) -> bool:
        return (self._event is not None and not self._event.query()) or any(not t.done for t in self._trackers)

    def wait(self, check: LivenessCheck = None) -> "Staging":
        """Block until no copy or send touches the buffer any more; returns self."""
        if self._event is not None:
            self._event.synchronize()
            self._event = None
        for tracker in self._trackers:
            wait_tracker(tracker, check)
        self._trackers.clear()
        return self


class StagingRing:
    """A few pinned slots that incoming frames land in before their copy to the device. A slot is
    handed out again only once the copy out of it has finished, so receiving the next message
    overlaps the copy of the last one."""

    def __init__(self, slot_bytes: int, slots: int = 4):
        self.slots = [Staging(slot_bytes) for _ in range(slots)]
        self._next = 0

    def take(self) -> Staging:
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        return slot.wait()


__all__ = ["Staging", "StagingRing", "init_cuda_early", "pick_server_device", "wait_tracker"]
