"""``ps.nn.Embedding`` and ``ps.nn.EmbeddingBag``: torch.nn's modules, with the weights on the servers.

>>> class Model(torch.nn.Module):                                      # doctest: +SKIP
...     def __init__(self):
...         super().__init__()
...         self.users = ps.nn.EmbeddingBag(None, 64, mode="sum")        # any int64 id: hashed, grows
...         self.items = ps.nn.EmbeddingBag(1_000_000, 64, mode="mean")  # ids in [0, 1e6)
...         self.tags = ps.nn.Embedding(50_000, 16)
>>> opt = ps.DistributedOptimizer(model, ps.optim.Adam(lr=1e-3),         # doctest: +SKIP
...                               sparse_optimizer=ps.optim.SparseAdam(lr=1e-2))

They take the arguments of torch's ``forward`` and return what torch's would. A table's weights
live only on the servers: forward pulls the rows of the batch's distinct ids (one message per
server), backward leaves their gradients, and ``DistributedOptimizer.step()`` pushes them. The
rows are on the module's device (``.to(device)`` moves the module as usual). A table's name is
its path in the model (``"users"`` above) unless ``name=`` says otherwise. A module works once a
``DistributedOptimizer`` over its model has registered it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .optim import OptimizerSpec
from .tables import RowInit, TableSpec

__all__ = ["Embedding", "EmbeddingBag", "RowInit", "TableModule", "tables_of"]

MODES = ("sum", "mean", "max")


class TableModule(torch.nn.Module):
    """What both modules share: the table's settings, and the rows of a batch from the servers (the
    base class the DistributedOptimizer recognises tables by)."""

    def __init__(self, num_embeddings: Optional[int], embedding_dim: int, *, optimizer: Optional[OptimizerSpec] = None,
                 capacity: Optional[int] = None, admit_after: int = 1, ttl_steps: Optional[int] = None,
                 init: Optional[RowInit] = None, seed: int = 0, name: Optional[str] = None):
        super().__init__()
        if optimizer is not None and not isinstance(optimizer, OptimizerSpec):
            raise ConfigError(f"optimizer= must be a ps.optim rule, got {type(optimizer).__name__}")
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.optimizer, self.table_name = optimizer, name
        self._settings = dict(capacity=capacity, admit_after=admit_after, ttl_steps=ttl_steps, init=init, seed=seed)
        self.table_spec("<check>")  # bad settings fail here, naming them
        self.pretrained_weight: Optional[torch.Tensor] = None
        self.register_buffer("_anchor", torch.empty(0), persistent=False)  # follows .to(device)
        self._owner = None

    def table_spec(self, name: str) -> TableSpec:
        return TableSpec(self.table_name or name, self.num_embeddings, self.embedding_dim,
                         pretrained=getattr(self, "pretrained_weight", None) is not None, **self._settings)

    def bind(self, owner, name: str) -> None:
        """Look rows up through ``owner`` (a DistributedOptimizer), as table ``name``."""
        self._owner, self.bound_name = owner, name

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def _rows(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the distinct ids of ``ids`` (a leaf that collects their gradients), and where
        each id of ``ids`` is among them."""
        if self._owner is None:
            raise ConfigError(f"{type(self).__name__} {self.table_name or ''} is not registered: create a "
                              "ps.DistributedOptimizer over its model first")
        return self._owner.lookup(self, ids)

    def extra_repr(self) -> str:
        size = "any id" if self.num_embeddings is None else self.num_embeddings
        return f"{size}, {self.embedding_dim}, rows on the servers"

    @classmethod
    def _pretrained(cls, module: "TableModule", embeddings: torch.Tensor) -> "TableModule":
        if embeddings.dim() != 2:
            raise ConfigError(f"from_pretrained needs a 2-D weight, got shape {tuple(embeddings.shape)}")
        module.pretrained_weight = embeddings.detach().to(torch.float32).cpu()
        return module


class EmbeddingBag(TableModule):
    """Like ``torch.nn.EmbeddingBag`` (``mode`` "sum", "mean" or "max"); ``num_embeddings`` None
    takes any int64 id (a hashed table that grows). See the module docstring."""

    def __init__(self, num_embeddings: Optional[int], embedding_dim: int, mode: str = "mean", *,
                 include_last_offset: bool = False, **table):
        if mode not in MODES:
            raise ConfigError(f"EmbeddingBag mode must be one of {', '.join(MODES)}; got {mode!r}")
        super().__init__(num_embeddings, embedding_dim, **table)
        self.mode, self.include_last_offset = mode, include_last_offset

    def forward(self, input: torch.Tensor, offsets: Optional[torch.Tensor] = None,
                per_sample_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        _check_bags(input, offsets, self.include_last_offset)
        if per_sample_weights is not None and self.mode != "sum":
            raise ConfigError(f"per_sample_weights work with mode='sum' only (as in torch), not {self.mode!r}")
        rows, where = self._rows(input)
        return F.embedding_bag(where.reshape(input.shape), rows, None if offsets is None else offsets.to(rows.device),
                               mode=self.mode, per_sample_weights=per_sample_weights,
                               include_last_offset=self.include_last_offset)

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, mode: str = "mean", **table) -> "EmbeddingBag":
        """Like torch's: a fixed table whose rows start as ``embeddings`` (rank 0's initialise the servers)."""
        return cls._pretrained(cls(embeddings.shape[0], embeddings.shape[1], mode, **table), embeddings)


class Embedding(TableModule):
    """Like ``torch.nn.Embedding``: one row per id, no pooling. See the module docstring."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows, where = self._rows(input)
        return F.embedding(where.reshape(input.shape), rows)

    @classmethod
    def from_pretrained(cls, embeddings: torch.Tensor, **table) -> "Embedding":
        """Like torch's: a fixed table whose rows start as ``embeddings`` (rank 0's initialise the servers)."""
        return cls._pretrained(cls(embeddings.shape[0], embeddings.shape[1], **table), embeddings)


def tables_of(model: torch.nn.Module) -> dict[str, TableModule]:
    """The model's embedding tables by name (the module's path in the model, or its ``name=``)."""
    tables: dict[str, TableModule] = {}
    for path, module in model.named_modules():
        if isinstance(module, TableModule):
            name = module.table_name or path
            if name in tables:
                raise ConfigError(f"two embedding tables of the model are both called {name!r}; give one name=")
            tables[name] = module
    return tables


def _check_bags(input: torch.Tensor, offsets: Optional[torch.Tensor], include_last: bool) -> None:
    """The shapes torch's EmbeddingBag takes, checked before anything is pulled."""
    if input.dim() == 2:
        if offsets is not None:
            raise ConfigError("EmbeddingBag: a 2-D input is a batch of equal bags; it takes no offsets")
        return
    if input.dim() != 1 or offsets is None:
        raise ConfigError(f"EmbeddingBag: a 1-D input needs offsets (a 2-D input none); got input of shape "
                          f"{tuple(input.shape)} and {'no ' if offsets is None else ''}offsets")
    if offsets.dim() != 1 or offsets.dtype not in (torch.int64, torch.int32):
        raise ConfigError("EmbeddingBag: offsets must be a 1-D tensor of int64 (or int32)")
    if offsets.numel() and (int(offsets[0]) != 0 or bool((offsets[1:] < offsets[:-1]).any())
                            or int(offsets[-1]) > input.numel()):
        raise ConfigError(f"EmbeddingBag: offsets must start at 0, never decrease and stay within the "
                          f"{input.numel()} ids; got {offsets.tolist()[:8]}")
    if include_last and offsets.numel() and int(offsets[-1]) != input.numel():
        raise ConfigError("EmbeddingBag: with include_last_offset the last offset must be the number of ids")
