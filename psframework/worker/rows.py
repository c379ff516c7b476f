"""Rows of embedding tables: the worker's pulls and pushes, one message per server.

Ids are checked and made distinct here, split by server (an id's bucket says which), and every
table of a pull or push goes to a server in the same message: through the row areas of the lane
to a server of this host (``datapath/lane.py``) where it fits and the area is free, else over the
socket. Pulled rows land in host buffers (received in place, or put there straight out of the
lane) and are put back in the order asked, on the device asked for. A push sums the
gradients of repeated ids first; in sync mode it reaches every server, also one that holds none of
its rows, so that each server counts the step (see ``server/rows.py``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .. import protocol as P
from .. import rowhash
from ..buffers import byte_view
from ..datapath.lane import ROW_PULLS, ROW_PUSHES, Lane, fits_row_area
from ..errors import ClosedError, ConfigError, PSError
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
            pieces = []  # (table index, spec, this server's ids, their places in the table's distinct ids, host)
            for _, index, spec, unique, _, host in tables:
                mine = (self._servers_of(unique) == server).nonzero().reshape(-1)
                if mine.numel():
                    pieces.append((index, spec, unique[mine].contiguous(), mine, host))
            if pieces:
                self._pull_from(server, future, epoch, pieces, train=train, after=after)
        future.add_finalizer(lambda: future.rows.update(
            {name: host[inverse].reshape(*lookups[name].shape, spec.dim).to(device or "cpu")
             for name, _, spec, _, inverse, host in tables}))
        return future

    def _pull_from(self, server: int, future: Future, epoch: int, pieces: list, **more) -> None:
        """One server's part of a pull: through the lane's row area if it fits and is free, else
        over the socket, the rows received in place and put where they belong in ``host``."""
        request = Request(future, server)
        header = {"tables": [index for index, *_ in pieces], "counts": [ids.numel() for _, _, ids, _, _ in pieces]}
        lane = self._row_lane(server, ROW_PULLS, [[ids.numel() * 8 for _, _, ids, _, _ in pieces],
                                                  [ids.numel() * spec.dim * 4 for _, spec, ids, _, _ in pieces]])
        if lane is not None:
            cursor = lane.row_cursor(ROW_PULLS)
            for _, _, ids, _, _ in pieces:
                cursor.take(ids.numel() * 8, torch.int64).copy_(ids)
            request.on_answer = self._rows_from_lane(server, pieces)
            self._send(request, epoch, P.PullRows, header, shm=True, **more)
            return
        for _, spec, ids, mine, host in pieces:
            request.frames.append(byte_view(ids))
            landing = torch.empty(ids.numel(), spec.dim)
            request.keep.append(landing)
            request.dest.append((byte_view(landing), _scatter(host, mine, landing)))
        self._send(request, epoch, P.PullRows, header, **more)

    def _row_lane(self, server: int, area: int, sizes: list[list[int]]) -> Optional[Lane]:
        """The lane to ``server``, its row ``area`` reserved, if pieces of ``sizes`` fit in each slot."""
        lanes = self.worker.lanes
        if lanes is None or not lanes.row_bytes or not all(fits_row_area(s, lanes.row_bytes) for s in sizes):
            return None
        return lanes.reserve_rows(server, area)

    def _rows_from_lane(self, server: int, pieces: list):
        def answered(request: Request, reply, ok: bool) -> Optional[PSError]:
            lanes = self.worker.lanes
            try:
                lane = lanes.lanes.get(server)
                if not ok or not isinstance(reply, P.RowValues):
                    return None
                if lane is None:
                    return ClosedError(f"worker {self.worker.rank}: the lane to server {server} is closed")
                cursor = lane.row_cursor(ROW_PULLS, pull_slot=True)
                for _, spec, ids, mine, host in pieces:
                    host[mine] = cursor.take(ids.numel() * spec.dim * 4, torch.float32).view(-1, spec.dim)
                return None
            finally:
                lanes.release_rows(server, ROW_PULLS)
        return answered

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
            pieces = []  # (table index, positions of this server's rows in its distinct ids, ids, gradients)
            for index, unique, total in tables:
                mine = (self._servers_of(unique) == server).nonzero().reshape(-1)
                if mine.numel() or sync:
                    pieces.append((index, mine, unique, total))
            if pieces:
                self._push_to(server, future, epoch, pieces, step)
        return future

    def _push_to(self, server: int, future: Future, epoch: int, pieces: list, step: int) -> None:
        """One server's part of a push: through the lane's row area if it fits and is free, else over the socket."""
        request = Request(future, server)
        header = {"tables": [index for index, *_ in pieces], "counts": [mine.numel() for _, mine, _, _ in pieces]}
        sizes = [n for _, mine, _, total in pieces for n in (mine.numel() * 8, mine.numel() * total.shape[1] * 4)]
        lane = self._row_lane(server, ROW_PUSHES, [sizes])
        if lane is None:
            for _, mine, unique, total in pieces:
                request.frames += [byte_view(unique[mine].contiguous()), byte_view(total[mine].contiguous())]
            self._send(request, epoch, P.PushRows, header, step=step)
            return
        cursor = lane.row_cursor(ROW_PUSHES)
        for _, mine, unique, total in pieces:
            torch.index_select(unique, 0, mine, out=cursor.take(mine.numel() * 8, torch.int64))
            torch.index_select(total, 0, mine, out=cursor.take(mine.numel() * total.shape[1] * 4,
                                                                torch.float32).view(-1, total.shape[1]))
        request.on_answer = lambda request, reply, ok: self.worker.lanes.release_rows(server, ROW_PUSHES)
        self._send(request, epoch, P.PushRows, header, step=step, shm=True)

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
        try:
            client.same_epoch(epoch)
        except PSError:
            if request.on_answer is not None:
                request.on_answer(request, None, False)  # frees the lane's row area it holds
            raise
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
