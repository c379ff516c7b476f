"""Dynamic batching: concurrent requests are answered by one forward pass.

The first request waiting opens a batch; more join until it holds ``max_rows`` examples or
``max_delay`` seconds have passed since it opened. The batch runs on a thread of its own (torch
releases the GIL), on the live copy of the model, so all of it is answered by one version.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional

import torch

from .model import ServedModel

Pending = tuple[torch.Tensor, asyncio.Future]


class ModelError(Exception):
    """The model failed on a batch (answered with a 500)."""


class Batcher:
    def __init__(self, served: ServedModel, device: str, max_rows: int, max_delay: float,
                 on_batch: Callable[[int], None] = lambda rows: None):
        self.served, self.device = served, torch.device(device)
        self.max_rows, self.max_delay = max_rows, max_delay
        self._on_batch = on_batch
        self._queue: Optional[asyncio.Queue] = None
        self._task: Optional[asyncio.Task] = None
        self._held: Optional[Pending] = None  # a request that did not fit in the last batch
        self._getter: Optional[asyncio.Future] = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="ps-serve-model")

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._getter is not None:
            self._getter.cancel()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def run(self, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The model's outputs for ``inputs`` (rows of examples), and the version that answered."""
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((inputs, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            try:
                outputs, version = await loop.run_in_executor(self._executor, self._forward, [x for x, _ in batch])
            except Exception as exc:  # the model's own failure: every request of the batch is told
                for _, future in batch:
                    if not future.done():
                        future.set_exception(ModelError(f"the model failed on a batch of {len(batch)} requests: "
                                                        f"{type(exc).__name__}: {exc}"))
                continue
            start = 0
            for inputs, future in batch:
                if not future.done():
                    future.set_result((outputs[start:start + inputs.shape[0]], version))
                start += inputs.shape[0]

    async def _gather(self) -> list[Pending]:
        first = self._held or await self._next(None)
        self._held = None
        batch, rows = [first], first[0].shape[0]
        deadline = time.monotonic() + self.max_delay
        while rows < self.max_rows:
            item = await self._next(max(0.0, deadline - time.monotonic()))
            if item is None:
                break
            if rows + item[0].shape[0] > self.max_rows:
                self._held = item
                break
            batch.append(item)
            rows += item[0].shape[0]
        return batch

    async def _next(self, timeout: Optional[float]) -> Optional[Pending]:
        """The next request, or None after ``timeout``; the get that timed out is kept for the next
        call (cancelling it could lose a request that arrived just then)."""
        if self._getter is None:
            self._getter = asyncio.ensure_future(self._queue.get())
        done, _ = await asyncio.wait({self._getter}, timeout=timeout)
        if not done:
            return None
        item, self._getter = self._getter.result(), None
        return item

    def _forward(self, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
        rows = sum(x.shape[0] for x in inputs)
        self._on_batch(rows)
        with self.served.live() as (module, version), torch.inference_mode():
            outputs = module(torch.cat(inputs).to(self.device))
        if not isinstance(outputs, torch.Tensor) or outputs.dim() == 0 or outputs.shape[0] != rows:
            raise ModelError(f"the model returned {type(outputs).__name__} "
                             f"{tuple(getattr(outputs, 'shape', ()))} for {rows} examples; it must return a tensor "
                             "with one row per example")
        return outputs.cpu(), version


__all__ = ["Batcher", "ModelError"]
