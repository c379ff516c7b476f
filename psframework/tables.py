"""Embedding tables: what a table is, and which server holds which of its rows (pure, no torch).

A table's rows live only on the servers. Rows are spread by hash: an id's bucket is a hash of the
id modulo ``NUM_BUCKETS``, and the scheduler maps each bucket to a server (``assign_buckets``), the
same map for every table, so that a later issue can move buckets between servers. The hash
itself and the initial values of rows are in ``rowhash.py`` (torch).

>>> spec = TableSpec("users", None, 64)
>>> spec.hashed, TableSpec.from_wire(spec.to_wire()) == spec
(True, True)
>>> assign_buckets(3, 8)
[0, 1, 2, 0, 1, 2, 0, 1]
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .errors import ConfigError, ProtocolError

NUM_BUCKETS = 4096
INITS = ("uniform", "normal", "constant")


@dataclass(frozen=True)
class RowInit:
    """How a new row starts: ``uniform`` in [low, high), ``normal`` with mean ``low`` and std
    ``high``, or ``constant`` ``low``. The default, uniform(+-1/sqrt(dim)), is ``RowInit.default(dim)``."""

    kind: str = "uniform"
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in INITS:
            raise ConfigError(f"row init must be one of {', '.join(INITS)}; got {self.kind!r}")
        for name in ("low", "high"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise ConfigError(f"row init {self.kind}: {name} must be a finite number, got {value!r}")
        if self.kind == "uniform" and not self.low < self.high:
            raise ConfigError(f"row init uniform: low {self.low} must be below high {self.high}")
        if self.kind == "normal" and self.high < 0:
            raise ConfigError(f"row init normal: std must be >= 0, got {self.high}")

    @classmethod
    def default(cls, dim: int) -> "RowInit":
        bound = 1.0 / math.sqrt(dim)
        return cls("uniform", -bound, bound)


@dataclass(frozen=True)
class TableSpec:
    """One embedding table as the job knows it. ``num_embeddings`` None: any int64 id (hashed, rows
    created on first touch); else ids in [0, num_embeddings). ``optimizer``: the update rule on
    the wire (``OptimizerSpec.to_wire()``), filled in at registration. ``pretrained``: rank 0's rows
    initialise the table (``from_pretrained``)."""

    name: str
    num_embeddings: Optional[int]
    dim: int
    dtype: str = "float32"
    optimizer: Optional[dict] = None
    capacity: Optional[int] = None
    admit_after: int = 1
    ttl_steps: Optional[int] = None
    init: Optional[RowInit] = None  # None: RowInit.default(dim)
    seed: int = 0
    pretrained: bool = False

    def __post_init__(self) -> None:
        _count(self, "dim", self.dim, minimum=1)
        if self.num_embeddings is not None:
            _count(self, "num_embeddings", self.num_embeddings, minimum=1)
        if self.capacity is not None:
            _count(self, "capacity", self.capacity, minimum=1)
        _count(self, "admit_after", self.admit_after, minimum=1)
        if self.ttl_steps is not None:
            _count(self, "ttl_steps", self.ttl_steps, minimum=1)
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"a table needs a non-empty name, got {self.name!r}")
        if self.init is None:
            object.__setattr__(self, "init", RowInit.default(self.dim))

    @property
    def hashed(self) -> bool:
        return self.num_embeddings is None

    @property
    def key(self) -> int:
        """A stable number for the table, mixed into its rows' initial values."""
        return zlib.crc32(self.name.encode()) ^ (self.seed & 0xFFFFFFFF)

    def shape_of(self) -> str:
        return f"({'any id' if self.hashed else self.num_embeddings}, {self.dim}) {self.dtype}"

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "num_embeddings": self.num_embeddings, "dim": self.dim, "dtype": self.dtype,
                "optimizer": self.optimizer, "capacity": self.capacity, "admit_after": self.admit_after,
                "ttl_steps": self.ttl_steps, "init": [self.init.kind, self.init.low, self.init.high],
                "seed": self.seed, "pretrained": self.pretrained}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> "TableSpec":
        try:
            kind, low, high = d["init"]
            return cls(str(d["name"]), d["num_embeddings"], d["dim"], str(d["dtype"]), d["optimizer"], d["capacity"],
                       d["admit_after"], d["ttl_steps"], RowInit(kind, low, high), d["seed"], bool(d["pretrained"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed table spec: {exc!r}") from None


def _count(spec: TableSpec, field_name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"table {spec.name!r}: {field_name} must be an int >= {minimum}, got {value!r}")


def assign_buckets(num_servers: int, num_buckets: int = NUM_BUCKETS) -> list[int]:
    """The server of each bucket: round robin, so every server holds an equal share of every table."""
    return [bucket % num_servers for bucket in range(num_buckets)]


def capacity_share(capacity: Optional[int], buckets: list[int], server: int) -> Optional[int]:
    """The rows of a table with ``capacity`` that ``server`` keeps: its share of the buckets, rounded
    up. Ids hash evenly over the buckets, so the servers together hold about ``capacity`` rows
    (at most one more per server), and each evicts its own least recently used ones."""
    if capacity is None:
        return None
    mine = sum(1 for owner in buckets if owner == server) if buckets else 1
    total = len(buckets) or 1
    return max(1, -(-capacity * mine // total))


__all__ = ["INITS", "NUM_BUCKETS", "RowInit", "TableSpec", "assign_buckets", "capacity_share"]
