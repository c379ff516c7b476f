"""Hashing of row ids, and the initial value of a row, as vectorised torch ops.

Everything here is a function of its inputs only: an id's bucket, and a new row's initial value
(a function of the table, the id and the table's seed), are the same on every process, on 1
server or 7, whatever order the rows are created in.

>>> import torch
>>> ids = torch.tensor([0, 1, -7, 2**62])
>>> bool((bucket_of(ids) == bucket_of(ids.clone())).all()) and int(bucket_of(ids).max()) < 4096
True
"""

from __future__ import annotations

import math

import torch

from .tables import NUM_BUCKETS, TableSpec


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 (wrapping multiplication): every bit of the id moves every bit."""
    x = x * _GOLDEN
    x = (x ^ _shr(x, 30)) * _MIX1
    x = (x ^ _shr(x, 27)) * _MIX2
    return x ^ _shr(x, 31)


def bucket_of(ids: torch.Tensor) -> torch.Tensor:
    """The bucket (0..NUM_BUCKETS-1) of each id."""
    return _shr(mix64(ids), 40) % NUM_BUCKETS


def _uniform01(ids: torch.Tensor, key: int, dim: int, salt: int) -> torch.Tensor:
    """[len(ids), dim] numbers in [0, 1), a function of (key, id, column, salt) only."""
    columns = torch.arange(dim, dtype=torch.int64, device=ids.device)
    seeds = mix64(ids ^ mix64(torch.tensor(key * 2 + salt, dtype=torch.int64, device=ids.device)))
    bits = mix64(seeds[:, None] + columns[None, :] * _GOLDEN)
    return _shr(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def initial_rows(spec: TableSpec, ids: torch.Tensor) -> torch.Tensor:
    """The initial values of the rows ``ids`` (int64) of a table, float32, on the ids' device."""
    init, dim = spec.init, spec.dim
    if init.kind == "constant":
        return torch.full((ids.numel(), dim), init.low, dtype=torch.float32, device=ids.device)
    u = _uniform01(ids, spec.key, dim, 0)
    if init.kind == "uniform":
        return (init.low + (init.high - init.low) * u).to(torch.float32)
    # normal: Box-Muller on two independent uniforms
    v = _uniform01(ids, spec.key, dim, 1)
    z = torch.sqrt(-2.0 * torch.log1p(-u)) * torch.cos(2.0 * math.pi * v)
    return (init.low + init.high * z).to(torch.float32)


def summed(ids: torch.Tensor, grads: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct ids, and the sum of the gradient rows of each."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    total = torch.zeros(unique.numel(), grads.shape[1], dtype=grads.dtype, device=grads.device)
    return unique, total.index_add_(0, inverse.to(grads.device), grads)


__all__ = ["bucket_of", "initial_rows", "mix64", "summed"]
