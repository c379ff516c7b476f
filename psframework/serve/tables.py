"""The embedding tables (``ps.nn``) of a served model: where their rows come from.

A table module looks its rows up through the owner it is bound to (``TableModule.bind``): while
training, the ``DistributedOptimizer``; when served, one of these.

- ``FileRows``: the rows an export wrote (``TABLE.ids`` and ``TABLE.rows``), bound into each copy
  of the model as it is filled, so that a batch reads rows of the version of its dense weights.
  An id the file does not hold reads as its initial row, the one the servers would have made.
- ``JobRows``: the rows of a live job, read at each batch through a reader of their own (the
  model's thread must not share the refresh thread's sockets). The servers keep only their current
  rows, so these may be newer than the dense weights, by at most what changed since the last refresh.
"""

from __future__ import annotations

import torch

from .. import rowhash
from ..errors import ConfigError
from ..nn import TableModule, tables_of
from ..tables import TableSpec
from ..worker.rows import as_ids

_ANY_SIZE = 1 << 62  # a served batch is not a message: no limit on its rows


class FileRows:
    def __init__(self, spec: TableSpec, ids: torch.Tensor, rows: torch.Tensor):
        self.spec, self.ids, self.rows = spec, ids, rows  # ids sorted, as export writes them

    def lookup(self, module: TableModule, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the distinct ids of ``ids``, and where each id is among them."""
        distinct, where = torch.unique(as_ids(self.spec, ids, _ANY_SIZE), return_inverse=True)
        rows = rowhash.initial_rows(self.spec, distinct)
        if self.ids.numel():
            at = torch.searchsorted(self.ids, distinct).clamp(max=self.ids.numel() - 1)
            held = self.ids[at] == distinct
            rows[held] = self.rows[at[held]]
        return rows.to(module.device), where.to(module.device)


def bind_file_rows(module: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Bind every table of ``module`` to its rows among ``tensors`` (an export's)."""
    for name, table in tables_of(module).items():
        ids, rows = tensors.get(f"{name}.ids"), tensors.get(f"{name}.rows")
        if ids is None or rows is None:
            raise ConfigError(f"{where} has no rows of the model's embedding table {name!r} ({name}.ids and "
                              f"{name}.rows, as python -m psframework.export writes them): is it the model this "
                              "factory builds?")
        spec = table.table_spec(name)
        if ids.dim() != 1 or rows.shape != (ids.numel(), spec.dim):
            raise ConfigError(f"{where}: table {name!r} has {tuple(ids.shape)} ids and rows of shape "
                              f"{tuple(rows.shape)}; the model's table has rows of {spec.dim}")
        order = ids.argsort()  # export writes them sorted; a file made otherwise may not be
        table.bind(FileRows(spec, ids[order].to(torch.int64), rows[order].to(torch.float32)), name)


class JobRows:
    def __init__(self, reader):
        self.reader = reader  # a ps.Reader used by the model's thread only

    def lookup(self, module: TableModule, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shard_map = self.reader.shard_map
        spec = shard_map.tables[shard_map.table_index(module.bound_name)]
        distinct, where = torch.unique(as_ids(spec, ids, _ANY_SIZE), return_inverse=True)
        rows = self.reader.lookup(module.bound_name, distinct)
        return rows.to(module.device), where.to(module.device)


def check_job_tables(module: torch.nn.Module, job_tables: list[TableSpec], job: str) -> list[str]:
    """The model's table names; ``ConfigError`` if the job lacks one or holds it with other rows."""
    held = {spec.name: spec for spec in job_tables}
    tables = tables_of(module)
    for name, table in tables.items():
        spec = held.get(name)
        if spec is None:
            raise ConfigError(f"the job at {job} has no embedding table {name!r} of the model (it has "
                              f"{', '.join(held) or 'none'}): is it the model this factory builds?")
        if spec.dim != table.embedding_dim:
            raise ConfigError(f"the job's table {name!r} has rows of {spec.dim}, the model's of {table.embedding_dim}")
    return list(tables)


__all__ = ["FileRows", "JobRows", "bind_file_rows", "check_job_tables"]
