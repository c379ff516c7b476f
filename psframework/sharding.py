"""Placement of a model's tensors on the parameter servers.

A model is a list of named tensors (``TensorSpec``). Servers own *blocks*: a block is one
flat contiguous buffer of one dtype, made of one or more *segments* (slices of flattened
tensors). The wire sends one frame per block and a server runs its update rule per block.

``assign_shards`` is a pure, deterministic function: the scheduler computes the
``ShardMap`` once and sends it (``to_wire``) to every node.

Example::

    >>> specs = [TensorSpec("w", (1024, 1024), "float32"), TensorSpec("b", (1024,), "float32")]
    >>> m = assign_shards(specs, num_servers=2, chunk_bytes=1 << 20)
    >>> m.server_bytes()
    [2099200, 2099200]
    >>> [(b.server, b.numel) for b in m.blocks]
    [(0, 1024), (0, 262144), (0, 261632), (1, 262144), (1, 262144), (1, 512)]
    >>> [(s.offset, s.numel) for _, s in m.segments_of("w")][:2]
    [(0, 262144), (262144, 261632)]

Placement rules:

* A tensor with ``nbytes <= chunk_bytes`` is *small* and is placed whole; a larger one is
  *large* and is cut into contiguous single-segment blocks of at most ``chunk_bytes``.
* Small tensors go first, largest first, each to the least-loaded server (ties: lowest
  index). On each server they are packed first-fit, in input order, into blocks of one
  dtype of at most ``chunk_bytes``.
* The large tensors are then poured, in input order, as one byte stream over the servers
  (in index order), water-filling every server up towards a common level.

Balance guarantee. Let ``mean = total_bytes / num_servers``, ``s_max`` the heaviest
server load after the small tensors, and ``e`` the largest itemsize among the large
tensors. If the model has a large tensor and ``s_max <= mean`` (equivalently: the large
bytes cover every server's deficit up to ``s_max``), every server holds
``< mean + e`` bytes, i.e. the level is met to within one element; hence
``max(server_bytes) <= 1.05 * mean`` whenever also ``mean >= 20 * e``. Both hold when the
large bytes are at least ``(num_servers - 1) * chunk_bytes`` and
``chunk_bytes >= 20 * e`` (greedy placement keeps ``s_max - s_min <= chunk_bytes``).
Otherwise the water level stays below ``s_max``: servers at or above it get nothing from
the large stream, the others are filled to a common level, and every server holds
``< max(mean, s_max) + e`` bytes. (Landing exactly on a byte level is not always
possible with whole elements, hence the one-element slack.)
"""

from __future__ import annotations

import functools
import heapq
import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from psframework.errors import ConfigError, ProtocolError
from psframework.tables import TableSpec, assign_buckets

DEFAULT_CHUNK_BYTES = 4 << 20
# shards on GPUs: each block costs a round of messages and of host work on both sides, which a
# device-to-device copy of 64 MiB (~30 us on an H200) does not repay at 4 MiB (benchmarks/gpu.py)
GPU_CHUNK_BYTES = 64 << 20
# one GPU server whose workers all reach it through device lanes (CUDA IPC): blocks spread nothing
# over servers, and the server applies an exchange through device lanes in one burst, so they
# pipeline nothing either; each one more only adds a round of messages (a GPT-like model on one
# H200: 0.77 -> 0.94 of single-process speed, RESULTS_GPU.md). Blocks that cross PCIe or a network
# keep the smaller size, whose copies and transfers overlap (one 256 MiB block through a
# shared-memory lane took 21.9 ms against 16.1 ms as four).
DEVICE_LANE_CHUNK_BYTES = 1 << 30


def default_chunk_bytes(server_device: Optional[str], num_servers: int = 1, device_lanes_only: bool = False) -> int:
    """The block size of a job that does not set one: larger where the shards are on GPUs, and
    larger still where one GPU server holds them all and every worker reaches it by device lanes."""
    if server_device is None or not server_device.startswith("cuda"):
        return DEFAULT_CHUNK_BYTES
    return DEVICE_LANE_CHUNK_BYTES if num_servers == 1 and device_lanes_only else GPU_CHUNK_BYTES


_ITEMSIZE = {
    "bool": 1,
    "uint8": 1,
    "int8": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int16": 2,
    "uint16": 2,
    "float16": 2,
    "bfloat16": 2,
    "int32": 4,
    "uint32": 4,
    "float32": 4,
    "int64": 8,
    "uint64": 8,
    "float64": 8,
    "complex64": 8,
    "complex128": 16,
}


@functools.lru_cache(maxsize=None)
def _dtype_info(dtype: str) -> Tuple[str, int]:
    """Canonical name and itemsize of a torch dtype name; ValueError if unknown."""
    if dtype in _ITEMSIZE:
        return dtype, _ITEMSIZE[dtype]
    import torch

    dt = getattr(torch, dtype, None) if dtype and not dtype.startswith("_") else None
    if not isinstance(dt, torch.dtype):
        raise ValueError(dtype)
    return str(dt).replace("torch.", "", 1), torch.empty((), dtype=dt).element_size()


def _as_count(value: Any) -> int:
    if isinstance(value, bool):
        raise TypeError("bool is not a count")
    return operator.index(value)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one model tensor. ``dtype`` is a torch dtype name
    without ``torch.`` ("float32"); aliases such as "float" are canonicalised."""

    name: str
    shape: Tuple[int, ...]
    dtype: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"tensor names must be non-empty strings, got {self.name!r}")
        try:
            shape = tuple(_as_count(d) for d in self.shape)
        except TypeError:
            raise ConfigError(
                f"tensor {self.name!r}: shape must be a sequence of ints, got {self.shape!r}"
            ) from None
        if any(d < 0 for d in shape):
            raise ConfigError(f"tensor {self.name!r}: negative dimension in shape {shape}")
        try:
            dtype, _ = _dtype_info(str(self.dtype))
        except ValueError:
            raise ConfigError(
                f"tensor {self.name!r}: unknown dtype {self.dtype!r} "
                "(use a torch dtype name such as 'float32')"
            ) from None
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)

    @property
    def numel(self) -> int:
        return functools.reduce(operator.mul, self.shape, 1)

    @property
    def itemsize(self) -> int:
        return _dtype_info(self.dtype)[1]

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    def to_wire(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(d["name"], tuple(d["shape"]), d["dtype"])

    @classmethod
    def of(cls, name: str, tensor: Any) -> TensorSpec:
        """The spec of a torch tensor."""
        return cls(name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", "", 1))


@dataclass(frozen=True)
class Segment:
    """``numel`` elements of tensor ``key`` from element ``offset`` of its flattened
    form, stored at element ``block_offset`` of its block."""

    key: str
    offset: int
    numel: int
    block_offset: int


@dataclass(frozen=True)
class Block:
    """One flat buffer of one dtype owned by one server."""

    block_id: int
    server: int
    dtype: str
    numel: int
    segments: Tuple[Segment, ...]

    @property
    def nbytes(self) -> int:
        return self.numel * _dtype_info(self.dtype)[1]


@dataclass(frozen=True)
class ShardMap:
    """Where every element of every tensor lives. ``blocks`` is ordered by server."""

    num_servers: int
    chunk_bytes: int
    tensors: Tuple[TensorSpec, ...]
    blocks: Tuple[Block, ...]
    tables: Tuple[TableSpec, ...] = ()  # embedding tables: rows spread over servers by bucket
    buckets: Tuple[int, ...] = ()  # the server of each bucket (tables.assign_buckets)

    def table_index(self, name: str) -> int:
        for index, spec in enumerate(self.tables):
            if spec.name == name:
                return index
        known = ", ".join(spec.name for spec in self.tables) or "none"
        raise ConfigError(f"unknown table {name!r}; the registered tables are: {known}")

    @functools.cached_property
    def _by_server(self) -> Tuple[Tuple[Block, ...], ...]:
        lists: List[List[Block]] = [[] for _ in range(self.num_servers)]
        for block in self.blocks:
            lists[block.server].append(block)
        return tuple(tuple(blocks) for blocks in lists)

    def blocks_of_server(self, server: int) -> Tuple[Block, ...]:
        if not 0 <= server < self.num_servers:
            raise ConfigError(f"server {server} out of range 0..{self.num_servers - 1}")
        return self._by_server[server]

    def server_bytes(self) -> List[int]:
        return [sum(b.nbytes for b in blocks) for blocks in self._by_server]

    def segments_of(self, key: str) -> List[Tuple[Block, Segment]]:
        """The (block, segment) pieces of tensor ``key``, in offset order."""
        return [(block, seg) for block, _, seg in self.pieces_of(key)]

    def pieces_of(self, key: str) -> List[Tuple[Block, int, Segment]]:
        """The pieces of tensor ``key`` in offset order: (block, index of the segment in the block, segment)."""
        try:
            return self._pieces[key]
        except KeyError:
            raise ConfigError(f"unknown tensor {key!r}: it is not in the shard map") from None

    @functools.cached_property
    def _pieces(self) -> Dict[str, List[Tuple[Block, int, Segment]]]:
        index: Dict[str, List[Tuple[Block, int, Segment]]] = {spec.name: [] for spec in self.tensors}
        for block in self.blocks:
            for i, seg in enumerate(block.segments):
                index[seg.key].append((block, i, seg))
        for pieces in index.values():
            pieces.sort(key=lambda piece: piece[2].offset)
        return index

    def to_wire(self) -> Dict[str, Any]:
        return {
            "num_servers": self.num_servers,
            "chunk_bytes": self.chunk_bytes,
            "tensors": [spec.to_wire() for spec in self.tensors],
            "blocks": [
                {
                    "id": b.block_id,
                    "server": b.server,
                    "dtype": b.dtype,
                    "numel": b.numel,
                    "segments": [[s.key, s.offset, s.numel, s.block_offset] for s in b.segments],
                }
                for b in self.blocks
            ],
            "tables": [spec.to_wire() for spec in self.tables],
            "buckets": list(self.buckets),
        }

    @classmethod
    def from_wire(cls, d: Mapping[str, Any]) -> ShardMap:
        try:
            m = cls(
                num_servers=int(d["num_servers"]),
                chunk_bytes=int(d["chunk_bytes"]),
                tensors=tuple(TensorSpec.from_wire(t) for t in d["tensors"]),
                blocks=tuple(
                    Block(
                        block_id=b["id"],
                        server=b["server"],
                        dtype=b["dtype"],
                        numel=b["numel"],
                        segments=tuple(Segment(*s) for s in b["segments"]),
                    )
                    for b in d["blocks"]
                ),
                tables=tuple(TableSpec.from_wire(t) for t in d.get("tables", ())),
                buckets=tuple(int(b) for b in d.get("buckets", ())),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ProtocolError(f"malformed shard map: {exc!r}") from exc
        m._check_refs()
        return m

    def _check_refs(self) -> None:
        names = {spec.name for spec in self.tensors}
        for i, block in enumerate(self.blocks):
            if block.block_id != i or not 0 <= block.server < self.num_servers:
                raise ProtocolError(
                    f"malformed shard map: block {i} has id {block.block_id}, "
                    f"server {block.server}"
                )
            unknown = [seg.key for seg in block.segments if seg.key not in names]
            if unknown:
                raise ProtocolError(
                    f"malformed shard map: block {i} names unknown tensor {unknown[0]!r}"
                )


# (tensor, element offset, element count) of one future segment.
_Piece = Tuple[TensorSpec, int, int]


def assign_shards(
    specs: Sequence[TensorSpec], num_servers: int, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    tables: Sequence[TableSpec] = (),
) -> ShardMap:
    """Place ``specs`` on ``num_servers`` servers in blocks of at most ``chunk_bytes``, and the rows
    of ``tables`` by bucket. See the module docstring for the rules and the balance guarantee."""
    specs = tuple(specs)
    _validate(specs, num_servers, chunk_bytes)
    small = [s for s in specs if s.nbytes <= chunk_bytes]
    large = [s for s in specs if s.nbytes > chunk_bytes]
    small_of, loads = _place_small(small, num_servers)
    large_of = _pour_large(large, loads, chunk_bytes)
    groups: List[Tuple[int, List[_Piece]]] = []
    for server in range(num_servers):
        groups += [(server, g) for g in _pack_small(small_of[server], chunk_bytes)]
        groups += [(server, [piece]) for piece in large_of[server]]
    blocks = tuple(_make_block(i, server, g) for i, (server, g) in enumerate(groups))
    buckets = tuple(assign_buckets(num_servers)) if tables else ()
    return ShardMap(num_servers, chunk_bytes, specs, blocks, tuple(tables), buckets)


def _validate(specs: Tuple[TensorSpec, ...], num_servers: int, chunk_bytes: int) -> None:
    for label, value in (("num_servers", num_servers), ("chunk_bytes", chunk_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{label} must be an int >= 1, got {value!r}")
    seen = set()
    for spec in specs:
        if not isinstance(spec, TensorSpec):
            raise ConfigError(f"expected TensorSpec, got {spec!r}")
        if spec.name in seen:
            raise ConfigError(f"tensor name {spec.name!r} appears more than once")
        seen.add(spec.name)
        if spec.numel > 0 and spec.itemsize > chunk_bytes:
            raise ConfigError(
                f"tensor {spec.name!r}: one {spec.dtype} element ({spec.itemsize} bytes) "
                f"does not fit in chunk_bytes={chunk_bytes}"
            )


def _place_small(
    small: List[TensorSpec], num_servers: int
) -> Tuple[List[List[TensorSpec]], List[int]]:
    """Largest first onto the least-loaded server; each server's list in input order."""
    order = sorted(range(len(small)), key=lambda i: (-small[i].nbytes, i))
    heap = [(0, server) for server in range(num_servers)]
    chosen: List[List[int]] = [[] for _ in range(num_servers)]
    loads = [0] * num_servers
    for i in order:
        load, server = heapq.heappop(heap)
        chosen[server].append(i)
        loads[server] = load + small[i].nbytes
        heapq.heappush(heap, (loads[server], server))
    return [[small[i] for i in sorted(idx)] for idx in chosen], loads


def _water_fill(loads: List[int], extra: int) -> List[int]:
    """Integer byte quotas summing to ``extra`` that raise the servers below the water
    level to it (levels differ by at most one byte; lower indices get the spare bytes)."""
    receivers = list(range(len(loads)))
    while True:
        total = extra + sum(loads[i] for i in receivers)
        keep = [i for i in receivers if loads[i] * len(receivers) < total]
        if len(keep) == len(receivers):
            break
        receivers = keep
    base, spare = divmod(total, len(receivers))
    quotas = [0] * len(loads)
    for rank, server in enumerate(receivers):
        quotas[server] = base + (rank < spare) - loads[server]
    return quotas


def _cut(stream_pos: int, start: int, itemsize: int, numel: int) -> int:
    """Element boundary of a tensor starting at byte ``start`` of the stream that is
    nearest to byte ``stream_pos`` (halves round up), clamped to the tensor. Monotone in
    ``stream_pos``, so consecutive cuts never lose or duplicate an element."""
    element = (2 * (stream_pos - start) + itemsize) // (2 * itemsize)
    return min(max(element, 0), numel)


def _pour_large(
    large: List[TensorSpec], loads: List[int], chunk_bytes: int
) -> List[List[_Piece]]:
    num_servers = len(loads)
    pieces: List[List[_Piece]] = [[] for _ in range(num_servers)]
    extra = sum(s.nbytes for s in large)
    if extra == 0:
        return pieces
    bounds = []  # (server, first stream byte, end stream byte)
    pos = 0
    for server, quota in enumerate(_water_fill(loads, extra)):
        if quota:
            bounds.append((server, pos, pos + quota))
            pos += quota
    start = 0
    for spec in large:
        end = start + spec.nbytes
        for server, lo_byte, hi_byte in bounds:
            if hi_byte <= start or lo_byte >= end:
                continue
            lo = _cut(lo_byte, start, spec.itemsize, spec.numel)
            hi = _cut(hi_byte, start, spec.itemsize, spec.numel)
            pieces[server] += _split(spec, lo, hi, chunk_bytes // spec.itemsize)
        start = end
    return pieces


def _split(spec: TensorSpec, lo: int, hi: int, max_numel: int) -> List[_Piece]:
    return [(spec, off, min(max_numel, hi - off)) for off in range(lo, hi, max_numel)]


def _pack_small(specs: List[TensorSpec], chunk_bytes: int) -> List[List[_Piece]]:
    """First-fit, in input order, into per-dtype groups of at most ``chunk_bytes``."""
    groups: List[List[_Piece]] = []
    used: List[int] = []
    for spec in specs:
        for i, group in enumerate(groups):
            if group[0][0].dtype == spec.dtype and used[i] + spec.nbytes <= chunk_bytes:
                group.append((spec, 0, spec.numel))
                used[i] += spec.nbytes
                break
        else:
            groups.append([(spec, 0, spec.numel)])
            used.append(spec.nbytes)
    return groups


def _make_block(block_id: int, server: int, group: List[_Piece]) -> Block:
    segments = []
    filled = 0
    for spec, offset, numel in group:
        segments.append(Segment(spec.name, offset, numel, filled))
        filled += numel
    return Block(block_id, server, group[0][0].dtype, filled, tuple(segments))


__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "GPU_CHUNK_BYTES",
    "DEVICE_LANE_CHUNK_BYTES",
    "default_chunk_bytes",
    "Block",
    "Segment",
    "ShardMap",
    "TensorSpec",
    "assign_shards",
]
