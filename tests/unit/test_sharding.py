"""Properties of the pure placement function ``assign_shards``."""

from __future__ import annotations

import doctest
import math
from typing import List

import msgpack
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import psframework.sharding as sharding
from psframework.errors import ConfigError, ProtocolError
from psframework.sharding import ShardMap, TensorSpec, assign_shards

DTYPES = ["float32", "float16", "bfloat16", "float64", "int64", "int8", "bool"]
MAX_ITEMSIZE = 8

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def models(draw, min_chunk: int = MAX_ITEMSIZE) -> tuple:
    dims = draw(st.lists(st.tuples(shapes, st.sampled_from(DTYPES)), max_size=12))
    specs = [TensorSpec(f"t{i}", shape, dtype) for i, (shape, dtype) in enumerate(dims)]
    return specs, draw(st.integers(1, 8)), draw(st.integers(min_chunk, 600))


def check_map(m: ShardMap, specs: List[TensorSpec]) -> None:
    """Every structural invariant of a shard map."""
    assert [b.block_id for b in m.blocks] == list(range(len(m.blocks)))
    assert m.tensors == tuple(specs)
    by_name = {s.name: s for s in specs}
    covered = {s.name: [] for s in specs}
    for block in m.blocks:
        assert 0 <= block.server < m.num_servers
        assert block.nbytes <= m.chunk_bytes
        assert block.numel == sum(seg.numel for seg in block.segments)
        filled = 0
        for seg in block.segments:
            assert by_name[seg.key].dtype == block.dtype
            assert seg.block_offset == filled
            filled += seg.numel
            covered[seg.key].append((seg.offset, seg.numel, block))
    for spec in specs:
        pieces = sorted(covered[spec.name], key=lambda p: p[0])
        assert sum(n for _, n, _ in pieces) == spec.numel
        pos = 0
        for offset, numel, _ in pieces:
            assert offset == pos
            pos += numel
        if spec.nbytes <= m.chunk_bytes:
            assert [(o, n) for o, n, _ in pieces] == [(0, spec.numel)]
        else:
            assert len(pieces) >= 2 and all(n > 0 for _, n, _ in pieces)
            assert all(len(b.segments) == 1 for _, _, b in pieces)
        got = [(s.offset, s.numel, b) for b, s in m.segments_of(spec.name)]
        assert got == pieces
    for server in range(m.num_servers):
        assert all(b.server == server for b in m.blocks_of_server(server))
    assert sum(len(m.blocks_of_server(s)) for s in range(m.num_servers)) == len(m.blocks)
    assert sum(m.server_bytes()) == sum(s.nbytes for s in specs)


def small_loads(m: ShardMap) -> List[int]:
    large = {s.name for s in m.tensors if s.nbytes > m.chunk_bytes}
    return [
        sum(b.nbytes for b in m.blocks_of_server(s) if b.segments[0].key not in large)
        for s in range(m.num_servers)
    ]


@settings(max_examples=300, deadline=None)
@given(models())
def test_coverage_and_block_invariants(model: tuple) -> None:
    specs, n, chunk = model
    check_map(assign_shards(specs, n, chunk), specs)


@st.composite
def models_with_enough_large(draw) -> tuple:
    """Large bytes >= num_servers * chunk_bytes, chunk_bytes >= 20 * itemsize."""
    specs, n, chunk = draw(models(min_chunk=20 * MAX_ITEMSIZE))
    for _ in range(draw(st.integers(1, 3))):
        dtype = draw(st.sampled_from(DTYPES))
        itemsize = TensorSpec("x", (), dtype).itemsize
        numel = draw(st.integers(chunk // itemsize + 1, 3 * chunk // itemsize))
        specs.append(TensorSpec(f"L{len(specs)}", (numel,), dtype))
    large = sum(s.nbytes for s in specs if s.nbytes > chunk)
    if large < n * chunk:
        specs.append(TensorSpec("filler", (n * chunk - large + chunk + 1,), "int8"))
    return draw(st.permutations(specs)), n, chunk


@settings(max_examples=300, deadline=None)
@given(models_with_enough_large())
def test_balanced_when_large_bytes_cover_the_servers(model: tuple) -> None:
    specs, n, chunk = model
    m = assign_shards(specs, n, chunk)
    check_map(m, specs)
    mean = sum(s.nbytes for s in specs) / n
    itemsize = max(s.itemsize for s in specs if s.nbytes > chunk)
    assert max(m.server_bytes()) < mean + itemsize  # within one element
    assert max(m.server_bytes()) <= 1.05 * mean


@pytest.mark.parametrize("n", [2, 3, 4])
def test_single_256mib_tensor_is_balanced(n: int) -> None:
    spec = TensorSpec("embedding", (64 << 20,), "float32")
    m = assign_shards([spec], n, 4 << 20)
    mean = spec.nbytes / n
    assert max(m.server_bytes()) <= 1.05 * mean
    assert max(m.server_bytes()) - min(m.server_bytes()) <= 4
    assert all(b.nbytes <= 4 << 20 for b in m.blocks)
    assert sum(s.numel for _, s in m.segments_of("embedding")) == spec.numel


@st.composite
def models_with_heavy_small(draw) -> tuple:
    """Too few large bytes to fill the gaps that the small tensors leave."""
    specs, n, chunk = draw(models())
    n = draw(st.integers(3, 8))
    specs.append(TensorSpec("heavy", (chunk,), "int8"))
    numel = draw(st.integers(chunk + 1, (n - 1) * chunk))
    specs.append(TensorSpec("large", (numel,), "int8"))
    return draw(st.permutations(specs)), n, chunk


@settings(max_examples=300, deadline=None)
@given(models_with_heavy_small())
def test_best_effort_when_guarantee_cannot_hold(model: tuple) -> None:
    specs, n, chunk = model
    m = assign_shards(specs, n, chunk)
    check_map(m, specs)
    loads, final = small_loads(m), m.server_bytes()
    mean = sum(s.nbytes for s in specs) / n
    itemsize = max(s.itemsize for s in specs if s.nbytes > chunk)
    assert max(final) < max(mean, max(loads)) + itemsize
    if max(loads) > mean:
        level = max(f for f, s in zip(final, loads) if f > s)  # highest server that got large bytes
        for f, s in zip(final, loads):
            # water-filling: those at or above the level got nothing, the rest reach it
            assert f == s if s >= level else f >= level - 2 * itemsize


def test_best_effort_concrete() -> None:
    specs = [TensorSpec("heavy", (1000,), "float32"), TensorSpec("big", (1200,), "float32")]
    m = assign_shards(specs, 4, 4000)
    assert m.server_bytes() == [4000, 1600, 1600, 1600]
    assert [b.segments[0].key for b in m.blocks_of_server(0)] == ["heavy"]


@settings(max_examples=100, deadline=None)
@given(models())
def test_deterministic(model: tuple) -> None:
    specs, n, chunk = model
    a, b = assign_shards(specs, n, chunk), assign_shards(list(specs), n, chunk)
    assert a == b
    assert msgpack.packb(a.to_wire()) == msgpack.packb(b.to_wire())


@settings(max_examples=100, deadline=None)
@given(models())
def test_wire_round_trip(model: tuple) -> None:
    specs, n, chunk = model
    m = assign_shards(specs, n, chunk)
    back = ShardMap.from_wire(msgpack.unpackb(msgpack.packb(m.to_wire())))
    assert back == m
    check_map(back, specs)
    wired = [msgpack.unpackb(msgpack.packb(s.to_wire())) for s in specs]
    assert [TensorSpec.from_wire(w) for w in wired] == specs


def test_from_wire_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        ShardMap.from_wire({"num_servers": 1})
    wire = assign_shards([TensorSpec("a", (4,), "float32")], 2).to_wire()
    wire["blocks"][0]["segments"][0][0] = "ghost"
    with pytest.raises(ProtocolError, match="ghost"):
        ShardMap.from_wire(wire)
    wire["blocks"][0]["server"] = 7
    with pytest.raises(ProtocolError, match="server 7"):
        ShardMap.from_wire(wire)


def test_segments_of_in_offset_order() -> None:
    specs = [TensorSpec("a", (10, 10), "float64"), TensorSpec("b", (3,), "float16")]
    m = assign_shards(specs, 3, 64)
    pieces = m.segments_of("a")
    assert [s.offset for _, s in pieces] == sorted(s.offset for _, s in pieces)
    assert pieces[0][1].offset == 0
    assert sum(s.numel for _, s in pieces) == 100
    assert [(s.offset, s.numel) for _, s in m.segments_of("b")] == [(0, 3)]
    with pytest.raises(ConfigError, match="'nope'"):
        m.segments_of("nope")


def test_zero_dim_and_empty_tensors() -> None:
    specs = [
        TensorSpec("scalar", (), "float32"),
        TensorSpec("empty", (0, 5), "float32"),
        TensorSpec("one", (1,), "int64"),
    ]
    m = assign_shards(specs, 2, 16)
    check_map(m, specs)
    assert [(s.offset, s.numel) for _, s in m.segments_of("empty")] == [(0, 0)]
    assert [(s.offset, s.numel) for _, s in m.segments_of("scalar")] == [(0, 1)]


def test_small_tensors_packed_by_dtype() -> None:
    specs = [TensorSpec(f"t{i}", (4,), "float32" if i % 2 else "float16") for i in range(6)]
    m = assign_shards(specs, 1, 1 << 10)
    assert [(b.dtype, [s.key for s in b.segments]) for b in m.blocks] == [
        ("float16", ["t0", "t2", "t4"]),
        ("float32", ["t1", "t3", "t5"]),
    ]


def test_tensor_spec_basics() -> None:
    t = torch.zeros(3, 4, dtype=torch.bfloat16)
    spec = TensorSpec.of("w", t)
    assert spec == TensorSpec("w", (3, 4), "bfloat16")
    assert (spec.numel, spec.itemsize, spec.nbytes) == (12, 2, 24)
    assert TensorSpec("s", [], "float").dtype == "float32"
    assert TensorSpec("s", [2], "float").shape == (2,)


@pytest.mark.parametrize("dtype", sorted(sharding._ITEMSIZE))
def test_itemsize_table_matches_torch(dtype: str) -> None:
    expected = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert TensorSpec("x", (), dtype).itemsize == expected


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: assign_shards([], 0), "num_servers.*0"),
        (lambda: assign_shards([], 2, 0), "chunk_bytes.*0"),
        (lambda: assign_shards([], True), "num_servers"),
        (lambda: assign_shards([TensorSpec("a", (1,), "int8")] * 2, 2), "'a'"),
        (lambda: TensorSpec("", (1,), "int8"), "non-empty"),
        (lambda: TensorSpec("neg", (2, -1), "int8"), "'neg'.*-1"),
        (lambda: TensorSpec("bad", (2.5,), "int8"), "'bad'"),
        (lambda: TensorSpec("weird", (2,), "notatype"), "'weird'.*notatype"),
        (lambda: TensorSpec("weird", (2,), "Tensor"), "'weird'"),
        (lambda: assign_shards([TensorSpec("wide", (3,), "float64")], 1, 4), "'wide'"),
    ],
)
def test_validation_errors_name_the_culprit(make, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()


def test_module_docstring_example() -> None:
    assert doctest.testmod(sharding).failed == 0


def test_many_tensors_is_fast() -> None:
    specs = [TensorSpec(f"p{i}", (257, 129), "float32") for i in range(2000)]
    specs.append(TensorSpec("emb", (1 << 22, 16), "float32"))
    m = assign_shards(specs, 8)
    total = sum(s.nbytes for s in specs)
    assert max(m.server_bytes()) <= 1.05 * total / 8
    assert math.isclose(sum(m.server_bytes()), total)


def test_a_tables_capacity_is_shared_by_its_servers_buckets():
    from psframework.tables import NUM_BUCKETS, assign_buckets, capacity_share

    assert capacity_share(None, assign_buckets(3), 0) is None
    assert capacity_share(10, assign_buckets(1), 0) == 10
    shares = [capacity_share(1000, assign_buckets(3), s) for s in range(3)]
    assert shares == [334, 334, 334] and 1000 <= sum(shares) <= 1003
    uneven = [0] * (NUM_BUCKETS * 3 // 4) + [1] * (NUM_BUCKETS // 4)
    assert [capacity_share(100, uneven, s) for s in (0, 1)] == [75, 25]
    assert capacity_share(1, assign_buckets(4), 2) == 1  # never none at all
