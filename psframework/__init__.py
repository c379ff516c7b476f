"""psframework: a parameter server for distributed PyTorch training over ZeroMQ.

>>> import psframework as ps
>>> with ps.LocalCluster(num_servers=2, num_workers=1) as cluster:     # doctest: +SKIP
...     with ps.init(scheduler=cluster.scheduler) as worker:
...         worker.register(model.named_parameters(), optimizer=ps.optim.SGD(lr=0.1))
...         worker.push_pull(grads, into=dict(model.named_parameters())).wait()
"""

from . import optim
from .cluster import LocalCluster
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
)
from .training import DistributedOptimizer
from .worker import Future, Worker, init

__version__ = "0.1.0"

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
    "RegistrationError",
    "Worker",
    "init",
    "optim",
]
