"""The worker role: the client that a training loop uses to push gradients and pull weights.

>>> import psframework as ps                                     # doctest: +SKIP
>>> with ps.init() as worker:                                     # doctest: +SKIP
...     worker.register(model.named_parameters(), optimizer=ps.optim.SGD(lr=0.1))
...     loss.backward()
...     worker.push_pull({n: p.grad for n, p in model.named_parameters()},
...                      into=dict(model.named_parameters())).wait()

The parts: ``worker`` (the ``Worker`` API), ``requests`` (requests, futures and their answers),
``exchange`` (one push, pull or push_pull, sent block by block), ``lanes`` (shared-memory lanes to
the servers of this host) and ``staging`` (copy streams and pinned buffers for GPU tensors).

Tensors on a GPU travel through pinned host buffers that the worker keeps per key and reuses:
gradients are copied into them on a copy stream of the worker and each block goes on the wire as
soon as its copy has landed; pulled values are copied on to the device block by block as they
arrive. ``Future.wait()`` orders the caller's current CUDA stream after those copies, so work
queued on that stream afterwards sees the new values.
"""

from .requests import Future
from .worker import Worker, init

__all__ = ["Future", "Worker", "init"]
