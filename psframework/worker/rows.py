"""Rows of embedding tables: the worker's pulls and pushes, one message per server.

Ids are checked and made distinct here, split by server (an id's bucket says which), and every
table of a pull or push goes to a server in the same message. Pulled rows land in host buffers
(received in place) and are put back in the order asked, on the device asked for. A push sums the
gradients of repeated ids first; in sync mode it reaches every server, also one that holds none of
its rows, so that each server counts the step (see ``server/rows.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .. import protocol as P
from .. import rowhash
from ..buffers import byte_view
from ..errors import ConfigError
from ..tables import TableSpec
from .requests import Future, Request

if TYPE_CHECKING:  # pragma: no cover
    from .worker import Worker


class RowsFuture(Future):
    """A pull of rows: ``wait()`` returns the rows, one tensor per table asked (or the one tensor)."""

    def __init__(self, client, names: list[str], single: bool):
        super().__init__(client)
        self._names, self._single = names, single
        self.rows: dict[str, torch.Tensor] = {}

    def wait(self, timeout: Optional[float] = None):
        super().wait(timeout)
        return self.rows[self._names[0]] if self._single else dict(self.rows)


def as_ids(spec: TableSpec, ids, max_message_bytes: int) -> torch.Tensor:
    """``ids`` as a flat int64 host tensor, checked against the table."""
    if not isinstance(ids, torch.Tensor):
        raise ConfigError(f"table {spec.name!r}: ids must be a tensor of int64, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise ConfigError(f"table {spec.name!r}: ids must be int64 (or int32), got {str(ids.dtype).replace('torch.', '')}")
    flat = ids.detach().reshape(-1).to("cpu", torch.int64)
    if not spec.hashed and flat.numel():
        bad = flat[(flat < 0) | (flat >= spec.num_embeddings)]
        if bad.numel():
            raise ConfigError(f"table {spec.name!r} has ids 0..{spec.num_embeddings - 1}; got id {int(bad[0])}")
    if flat.numel() * spec.dim * 4 > max_message_bytes:
        raise ConfigError(f"table {spec.name!r}: {flat.numel()} rows of {spec.dim} floats exceed the largest message "
                          f"({max_message_bytes} bytes, PS_MAX_MESSAGE_BYTES); use smaller batches")
    return flat


class RowClient:
    def __init__(self, worker: "Worker"):
        self.worker = worker
        self._buckets = torch.tensor(worker.shard_map.buckets, dtype=torch.int64)
        # the largest frame any process of the job takes (the job's setting may be below ours)
        self.max_message_bytes = min(worker.config.max_message_bytes, worker.membership.welcome.max_message_bytes or 1 << 62)

    def spec(self, name: str) -> tuple[int, TableSpec]:
        index = self.worker.shard_map.table_index(name)
        return index, self.worker.shard_map.tables[index]

    def _servers_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self._buckets[rowhash.bucket_of(ids)]

    def pull(self, lookups: dict[str, torch.Tensor], train: bool = True, after: int = 0,
             device: Optional[torch.device] = None, single: bool = False) -> RowsFuture:
        """The rows of ``lookups`` (table name -> ids, repeats allowed), in the order asked, on ``device``."""
        client = self.worker.client
        client.catch_up()
        future = RowsFuture(client, list(lookups), single)
        epoch = client.rollback
        tables = []
        for name, ids in lookups.items():
            index, spec = self.spec(name)
            flat = as_ids(spec, ids, self.max_message_bytes)
            unique, inverse = torch.unique(flat, return_inverse=True)
            tables.append((name, index, spec, unique, inverse, torch.empty(unique.numel(), spec.dim)))
        for server in range(self.worker.num_servers):
            request = Request(future, server)
            header = {"tables": [], "counts": []}
            for name, index, spec, unique, _, host in tables:
                mine = (self._servers_of(unique) == server).nonzero().reshape(-1)
                if not mine.numel():
                    continue
                header["tables"].append(index)
                header["counts"].append(mine.numel())
                request.frames.append(byte_view(unique[mine].contiguous()))
                landing = torch.empty(mine.numel(), spec.dim)
                request.keep.append(landing)
                request.dest.append((byte_view(landing), _scatter(host, mine, landing)))
            if header["tables"]:
                self._send(request, epoch, P.PullRows, header, train=train, after=after)
        future.add_finalizer(lambda: future.rows.update(
            {name: host[inverse].reshape(*lookups[name].shape, spec.dim).to(device or "cpu")
             for name, _, spec, _, inverse, host in tables}))
        return future

    def push(self, pushes: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Future:
        """Push row gradients (table name -> (ids, grads)); repeated ids are summed first."""
        client = self.worker.client
        client.catch_up()
        future, epoch = Future(client), client.rollback
        step = self.worker.next_push_step()
        tables = []
        for name, (ids, grads) in pushes.items():
            index, spec = self.spec(name)
            flat = as_ids(spec, ids, self.max_message_bytes)
            grads = _check_grads(spec, grads, flat.numel())
            unique, total = rowhash.summed(flat, grads)
            tables.append((index, unique, total.contiguous()))
        sync = self.worker.mode == "sync"
        for server in range(self.worker.num_servers):
            request, header = Request(future, server), {"tables": [], "counts": []}
            for index, unique, total in tables:
                mine = (self._servers_of(unique) == server).nonzero().reshape(-1)
                if not mine.numel() and not sync:
                    continue
                header["tables"].append(index)
                header["counts"].append(mine.numel())
                request.frames += [byte_view(unique[mine].contiguous()), byte_view(total[mine].contiguous())]
            if header["tables"] or sync:
                self._send(request, epoch, P.PushRows, header, step=step)
        return future

    def load_pretrained(self, tables) -> None:
        """Rank 0's rows of the tables made ``from_pretrained`` go to the servers."""
        for name, table in tables.items():
            weight = getattr(table, "pretrained_weight", None)
            if weight is not None:
                self.load(name, torch.arange(weight.shape[0]), weight)

    def load(self, name: str, ids: torch.Tensor, values: torch.Tensor) -> None:
        """Rank 0's pretrained rows go to their servers (in pieces that fit in a message)."""
        index, spec = self.spec(name)
        values = values.detach().to("cpu", torch.float32).reshape(-1, spec.dim)
        rows_per_message = max(1, self.max_message_bytes // (spec.dim * 4 + 8) // 2)
        for start in range(0, ids.numel(), rows_per_message):
            piece = ids[start:start + rows_per_message]
            future = Future(self.worker.client)
            for server in range(self.worker.num_servers):
                mine = (self._servers_of(piece) == server).nonzero().reshape(-1)
                if mine.numel():
                    request = Request(future, server)
                    request.frames += [byte_view(piece[mine].contiguous()),
                                       byte_view(values[start:start + rows_per_message][mine].contiguous())]
                    self._send(request, self.worker.client.rollback, P.InitRows,
                               {"tables": [index], "counts": [mine.numel()]})
            future.wait()

    def _send(self, request: Request, epoch: int, kind: type, header: dict, **more) -> None:
        client = self.worker.client
        client.same_epoch(epoch)
        req = client.next_id()
        message = kind(req=req, rank=self.worker.rank, rollback=client.rollback, **header, **more)
        request.frames.insert(0, P.encode(message))
        client.submit(request, req)


def _scatter(host: torch.Tensor, positions: torch.Tensor, landing: torch.Tensor):
    def landed() -> None:
        host[positions] = landing
    return landed


def _check_grads(spec: TableSpec, grads, count: int) -> torch.Tensor:
    if not isinstance(grads, torch.Tensor) or not grads.is_floating_point():
        raise ConfigError(f"table {spec.name!r}: gradients must be a floating tensor")
    if grads.numel() != count * spec.dim:
        raise ConfigError(f"table {spec.name!r}: {count} ids need gradients of shape ({count}, {spec.dim}), "
                          f"got {tuple(grads.shape)}")
    return grads.detach().reshape(count, spec.dim).to("cpu", torch.float32)


__all__ = ["RowClient", "RowsFuture", "as_ids"]
