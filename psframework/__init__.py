"""psframework: a parameter server for distributed PyTorch training over ZeroMQ.

>>> import psframework as ps
>>> with ps.LocalCluster(num_servers=2, num_workers=1) as cluster:     # doctest: +SKIP
...     with ps.init(scheduler=cluster.scheduler) as worker:
...         worker.register(model.named_parameters(), optimizer=ps.optim.SGD(lr=0.1))
...         worker.push_pull(grads, into=dict(model.named_parameters())).wait()

The public names load lazily, so the scheduler process (which needs no torch) starts fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import (
    BadRequestError,
    CheckpointError,
    ClosedError,
    ConfigError,
    PeerLostError,
    ProtocolError,
    PSError,
    PSTimeoutError,
    RegistrationError,
    RolledBackError,
)

__version__ = "0.1.0"

_LAZY = {
    "DistributedOptimizer": ".training",
    "Future": ".worker",
    "LocalCluster": ".cluster",
    "Reader": ".reader",
    "Worker": ".worker",
    "init": ".worker",
}

if TYPE_CHECKING:  # pragma: no cover
    from . import compress, nn, optim
    from .cluster import LocalCluster
    from .reader import Reader
    from .training import DistributedOptimizer
    from .worker import Future, Worker, init


def __getattr__(name: str):
    if name in ("compress", "optim", "nn"):
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'psframework' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "BadRequestError",
    "CheckpointError",
    "ClosedError",
    "ConfigError",
    "DistributedOptimizer",
    "Future",
    "LocalCluster",
    "PSError",
    "PSTimeoutError",
    "PeerLostError",
    "ProtocolError",
    "Reader",
    "RegistrationError",
    "RolledBackError",
    "Worker",
    "compress",
    "init",
    "nn",
    "optim",
]
