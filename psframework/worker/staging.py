"""Device staging on the worker: the copy streams and the pinned host buffers of GPU tensors.

ZeroMQ sends and receives host memory, so a tensor on a GPU travels through a pinned buffer kept
per key and reused (``devices.Staging``). Copies run on streams of the worker's own, one per
device and direction ("push": device to host, "pull": host to device), so that the two directions
of PCIe run at once instead of queueing behind each other.
"""

from __future__ import annotations

import torch

from ..devices import Staging


class DeviceStaging:
    def __init__(self) -> None:
        self._streams: dict[tuple[torch.device, str], "torch.cuda.Stream"] = {}
        self._pools: dict[str, dict[str, Staging]] = {"push": {}, "pull": {}}

    def stream(self, device: torch.device, direction: str) -> "torch.cuda.Stream":
        stream = self._streams.get((device, direction))
        if stream is None:
            stream = self._streams[(device, direction)] = torch.cuda.Stream(device)
        return stream

    def buffer(self, direction: str, name: str, tensor: torch.Tensor) -> Staging:
        """The pinned buffer that carries ``name`` in ``direction``, sized for ``tensor``."""
        pool = self._pools[direction]
        nbytes = tensor.numel() * tensor.element_size()
        staging = pool.get(name)
        if staging is None or staging.nbytes != nbytes:
            staging = pool[name] = Staging(nbytes)
        return staging

    def synchronize(self) -> None:
        """Wait for every copy queued on our streams."""
        for stream in self._streams.values():
            stream.synchronize()


__all__ = ["DeviceStaging"]
