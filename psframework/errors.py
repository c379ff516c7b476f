"""The psframework error tree.

Every error the framework raises is a ``PSError``; the subclass says whose fault it was::

    PSError
    ├── ConfigError          bad input from the user: options, hostfiles, API arguments
    │   └── RegistrationError   workers registered different tensors, or registered twice
    ├── BadRequestError      a server refused a request (unknown key, wrong shape or dtype)
    ├── ProtocolError        a malformed message arrived (garbage, truncated, oversized)
    ├── PeerLostError        another node of the job died or stopped answering
    │   └── RolledBackError     a server was restarted: the job went back to a checkpoint (``.step``)
    ├── PSTimeoutError       a deadline passed (cluster start, barrier, request)
    ├── ClosedError          this object was closed by us; it is no longer usable
    └── CheckpointError      a checkpoint is missing, incomplete or corrupt

Messages say what was wrong, with which key/rank/host, and what to do about it.
"""

from __future__ import annotations


class PSError(Exception):
    """Root of every error raised by psframework."""


class ConfigError(PSError):
    """Bad input from the user: a wrong option, hostfile line or API argument."""


class RegistrationError(ConfigError):
    """Workers disagreed on the registered tensors, or a worker registered twice."""


class BadRequestError(PSError):
    """A server refused a request: unknown key, wrong shape or dtype."""


class ProtocolError(PSError):
    """A message that does not follow the wire format arrived."""


class PeerLostError(PSError):
    """Another node of the job died or stopped answering."""

    def __init__(self, message: str, *, role: str = "", rank: int = -1, host: str = ""):
        super().__init__(message)
        self.role = role
        self.rank = rank
        self.host = host


class RolledBackError(PeerLostError):
    """A server was restarted, and the whole job went back to its newest checkpoint: what was
    waited for belongs to the steps after it. ``step`` is where to go on from (pull the values
    again; ``ps.DistributedOptimizer`` does all this by itself)."""

    def __init__(self, message: str, *, step: int = 0):
        super().__init__(message, role="server")
        self.step = step


class PSTimeoutError(PSError, TimeoutError):
    """A deadline passed before the awaited event happened."""


class ClosedError(PSError):
    """The object was closed by its owner and can no longer be used."""


class CheckpointError(PSError):
    """A checkpoint is missing, incomplete or does not match its manifest."""


__all__ = [
    "BadRequestError",
    "CheckpointError",
    "ClosedError",
    "ConfigError",
    "PSError",
    "PSTimeoutError",
    "PeerLostError",
    "ProtocolError",
    "RegistrationError",
    "RolledBackError",
    "error_for",
]


_KINDS = {
    "bad_request": BadRequestError,
    "registration": RegistrationError,
    "peer_lost": PeerLostError,
    "timeout": PSTimeoutError,
    "protocol": ProtocolError,
    "config": ConfigError,
    "checkpoint": CheckpointError,
    "unmapped": ConfigError,
}


def error_for(kind: str, message: str, step: int = 0) -> PSError:
    """The exception an ``Error`` message from another node stands for."""
    if kind == "rolled_back":
        return RolledBackError(message, step=step)
    return _KINDS.get(kind, PSError)(message)
