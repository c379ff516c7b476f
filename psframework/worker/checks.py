"""Checks of what a training loop hands the worker: tensors, their names, shapes and dtypes, tables."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Iterable, Optional, Union

import torch

from ..buffers import dtype_name
from ..errors import BadRequestError, ConfigError
from ..optim import OptimizerSpec
from ..server.row_rules import check_rule
from ..sharding import TensorSpec
from ..tables import TableSpec

TensorsLike = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def as_dict(tensors: TensorsLike, what: str, allow_none: bool = False) -> dict[str, Optional[torch.Tensor]]:
    """``tensors`` as a dict of names to tensors (or None, where ``allow_none``), every item checked."""
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    result: dict[str, torch.Tensor] = {}
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a mapping or (name, tensor) pairs; got item {item!r}") from None
        if not isinstance(name, str) or not (isinstance(tensor, torch.Tensor) or (allow_none and tensor is None)):
            raise ConfigError(f"{what}: expected (str, Tensor), got ({type(name).__name__}, {type(tensor).__name__})")
        if name in result:
            raise ConfigError(f"{what}: name {name!r} appears twice")
        result[name] = tensor
    return result


def check_tensor(specs: dict[str, TensorSpec], name: str, tensor: torch.Tensor, what: str) -> None:
    """``BadRequestError`` unless ``tensor`` matches what ``name`` was registered with."""
    spec = specs.get(name)
    if spec is None:
        known = ", ".join(list(specs)[:8])
        raise BadRequestError(f"{what}: unknown key {name!r}; registered keys include: {known}")
    if tuple(tensor.shape) != spec.shape:
        raise BadRequestError(f"{what}: key {name!r} has shape {tuple(tensor.shape)} but was registered "
                              f"with shape {spec.shape}")
    if dtype_name(tensor.dtype) != spec.dtype:
        raise BadRequestError(f"{what}: key {name!r} has dtype {dtype_name(tensor.dtype)} but was registered "
                              f"with dtype {spec.dtype}")


def check_dense(tensors: dict[str, torch.Tensor], optimizer: OptimizerSpec) -> None:
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise ConfigError(f"tensor {name!r} has dtype {dtype_name(t.dtype)}; only floating tensors can be "
                              "registered (server optimizers need them)")
    if tensors and optimizer.tables_only:
        raise ConfigError(f"{type(optimizer).__name__} updates the rows of embedding tables only; give dense "
                          "tensors another rule (e.g. ps.optim.Adam) and the tables sparse_optimizer=")


def table_specs_of(tables: Mapping[str, Any], sparse_optimizer: Optional[OptimizerSpec]) -> dict[str, TableSpec]:
    """The specs of tables given as ps.nn modules or specs, each with its update rule filled in."""
    specs = {}
    for name, table in tables.items():
        spec = table.table_spec(name) if hasattr(table, "table_spec") else table
        if not isinstance(spec, TableSpec):
            raise ConfigError(f"table {name!r}: expected a ps.nn.Embedding, ps.nn.EmbeddingBag or TableSpec, "
                              f"got {type(table).__name__}")
        rule = getattr(table, "optimizer", None) or sparse_optimizer
        if spec.optimizer is None and rule is None:
            raise ConfigError(f"table {name!r} has no update rule: pass sparse_optimizer= (e.g. "
                              "ps.optim.SparseAdam(lr=1e-2)) or the module's optimizer=")
        if spec.optimizer is None:
            check_rule(rule)
            spec = dataclasses.replace(spec, optimizer=rule.to_wire())
        specs[name] = spec
    return specs


__all__ = ["TensorsLike", "as_dict", "check_dense", "check_tensor", "table_specs_of"]
