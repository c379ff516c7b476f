"""A server's part of a checkpoint: its blocks, their clocks and the optimizer state, and the rows
of its tables with theirs, in one file."""

from __future__ import annotations

import logging
from pathlib import Path
from .. import checkpoint
from .. import protocol as P
from .rows import RowStore
from .store import DenseStore

log = logging.getLogger("psframework.server")


def save(store: DenseStore, rows: RowStore, message: P.Save) -> P.Message:
    """Write this server's shard file; the answer for the scheduler (``Saved`` or an ``Error``)."""
    path = Path(message.path)
    try:
        sha256, size = checkpoint.save_shard(path, {"rank": store.rank, **store.snapshot(), "rows": rows.snapshot()})
    except Exception as exc:  # disk full, permissions: the job must hear it, not hang
        return P.Error(kind=P.CHECKPOINT_ERROR, message=f"cannot write {path}: {exc}")
    return P.Saved(path=str(path), sha256=sha256, bytes=size)


def load(store: DenseStore, rows: RowStore, message: P.Load) -> P.Message:
    """Restore this server's blocks and rows from its shard file; the answer for the scheduler."""
    path = Path(message.path)
    try:
        payload = checkpoint.load_shard(path, message.sha256)
        store.restore(payload, str(path))
        rows.restore(payload.get("rows", {}))
    except Exception as exc:
        return P.Error(kind=P.CHECKPOINT_ERROR, message=f"cannot restore {path}: {exc}")
    log.info("server %d restored %s", store.rank, path)
    return P.Loaded(path=str(path))


__all__ = ["load", "save"]
