"""The row store: the rows of every embedding table a server holds, behind the same seams as blocks.

All tables' rows on one server form one unit of the consistency policy (``RowChannel``): a
worker's step sends one row push to each server, carrying its rows of every table. In sync mode
the step's gradients of all workers are gathered per table, duplicates summed, divided by the
number of workers (a worker that did not touch a row counts as zero) and applied once; in async
mode each push is applied as it arrives. Pulls are answered by the policy's rules, with the
current rows. The tables themselves are ``table.Table``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .. import protocol as P
from .. import rowhash
from ..buffers import host_tensor
from ..datapath.lane import ROW_PULLS, ROW_PUSHES, Lane, fits_row_area
from ..errors import ConfigError
from ..optim import optimizer_from_wire
from ..sharding import ShardMap
from ..tables import capacity_share
from ..transport import Socket
from .row_rules import check_rule
from .table import Table


@dataclass
class RowChannel:
    """The unit of the policy for the rows of a server's tables (see ``policy.py``)."""
    clocks: list[int]
    names: list[str]
    version: int = 0
    accums: dict = field(default_factory=dict)
    pulls: list = field(default_factory=list)
    broken: Optional[str] = None
    store: Any = None
    key = "rows"
    size = 0

    def describe(self) -> str:
        return f"the rows of tables {', '.join(repr(n) for n in self.names)}"


@dataclass
class RowPush:
    """One worker's row gradients: (table index, distinct ids, gradients) per table."""
    tables: list[tuple[int, torch.Tensor, torch.Tensor]]


@dataclass
class RowPending:
    """A pull of rows waiting to be answered: (table index, distinct ids) per table."""
    peer: bytes
    req: int
    rank: int
    need_version: int
    lookups: list[tuple[int, torch.Tensor]]
    train: bool
    lane: Optional[Lane] = None  # the lane whose row area the answer goes into
    reader: bool = False  # a reader's (``rank``: the reader), answered at once


class RowStore:
    def __init__(self, device: torch.device):
        self.device = device
        self.tables: dict[int, Table] = {}  # by index in the shard map's tables
        self.channel: Optional[RowChannel] = None
        self._buckets: Optional[torch.Tensor] = None  # server of each bucket
        self.rank = -1

    def setup(self, shard_map: ShardMap, rank: int, num_workers: int) -> None:
        self.rank = rank
        self.tables = {}
        for index, spec in enumerate(shard_map.tables):
            rule = optimizer_from_wire(spec.optimizer)
            check_rule(rule)
            share = capacity_share(spec.capacity, list(shard_map.buckets), rank)
            self.tables[index] = Table(spec, rule, self.device, share)
        self._buckets = torch.tensor(shard_map.buckets, dtype=torch.int64) if shard_map.buckets else None
        names = [spec.name for spec in shard_map.tables]
        self.channel = RowChannel(clocks=[0] * num_workers, names=names, store=self) if names else None

    # -- requests ------------------------------------------------------------------------

    def receive(self, request: P.RowRequest, data: Socket, lane: Optional[Lane] = None) -> list[tuple]:
        """The ids (and for a push the gradients or values) of each table, from the frames or, for a
        lane request, copied out of the lane's row area (the worker reuses it once answered)."""
        if self.channel is None:
            raise P.Rejected(P.BAD_REQUEST, f"server {self.rank} holds no embedding tables")
        if len(request.tables) != len(request.counts) or len(set(request.tables)) != len(request.tables):
            raise P.Rejected(P.BAD_REQUEST, "a row request needs one count per table, each table once")
        take = self._frame_reader(data) if lane is None else _area_reader(lane, request)
        with_values = not isinstance(request, (P.PullRows, P.ReadRows))
        if lane is not None and not with_values:
            self._check_answer_fits(request, lane)
        parts = []
        for index, count in zip(request.tables, request.counts):
            table = self.tables.get(index)
            if table is None or count < 0:
                raise P.Rejected(P.BAD_REQUEST, f"no table {index} here, or a negative count {count}")
            ids = take(count * 8, torch.int64, f"ids of table {table.spec.name!r}")
            self._check_ids(table, ids)
            if with_values:
                grads = take(count * table.spec.dim * 4, torch.float32, f"rows of {table.spec.name!r}")
                parts.append((index, ids, grads.view(count, table.spec.dim)))
            else:
                parts.append((index, ids))
        if lane is None and data.more():
            raise P.Rejected(P.PROTOCOL, "a row request with more frames than its tables announce")
        return parts

    def _check_answer_fits(self, request: P.RowRequest, lane: Lane) -> None:
        """The rows a lane pull asks for must fit in its row area, where they will be answered."""
        sizes = [count * self.tables[index].spec.dim * 4 for index, count in zip(request.tables, request.counts)
                 if index in self.tables and count >= 0]
        if not fits_row_area(sizes, lane.row_bytes):
            raise P.Rejected(P.BAD_REQUEST, f"a pull of {sum(sizes)} bytes of rows through a lane whose row area "
                                            f"holds {lane.row_bytes}; send it over the socket")

    @staticmethod
    def _frame_reader(data: Socket):
        def take(expected: int, dtype: torch.dtype, what: str) -> torch.Tensor:
            if not data.more():
                raise P.Rejected(P.PROTOCOL, f"a row request announced {what} but sent no frame for it")
            frame = data.recv_buffer()
            got = len(memoryview(frame))
            if got != expected:
                raise P.Rejected(P.BAD_REQUEST, f"{what}: a frame of {got} bytes, expected {expected}")
            return host_tensor(frame, dtype)
        return take

    def _check_ids(self, table: Table, ids: torch.Tensor) -> None:
        spec = table.spec
        if not spec.hashed and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= spec.num_embeddings):
            raise P.Rejected(P.BAD_REQUEST, f"table {spec.name!r} has ids 0..{spec.num_embeddings - 1}")
        if ids.numel() and bool((self._buckets[rowhash.bucket_of(ids)] != self.rank).any()):
            raise P.Rejected(P.BAD_REQUEST, f"ids of table {spec.name!r} that server {self.rank} does not hold")
        if ids.numel() > 1 and torch.unique(ids).numel() != ids.numel():
            raise P.Rejected(P.BAD_REQUEST, f"ids of table {spec.name!r} repeat within one request")

    def lookup(self, pending: RowPending, into: Optional[list[torch.Tensor]] = None) -> list[torch.Tensor]:
        """The rows a pull asks for, on the host, contiguous; or written ``into`` these tensors."""
        if into is None:
            return [self.tables[index].lookup(ids.to(self.device), pending.train).cpu().contiguous()
                    for index, ids in pending.lookups]
        for target, (index, ids) in zip(into, pending.lookups):
            self.tables[index].lookup(ids.to(self.device), pending.train, out=target)
        return into

    def shapes(self, pending: RowPending) -> list[tuple[int, int]]:
        """The shape of the rows answering each table of a pull."""
        return [(ids.numel(), self.tables[index].spec.dim) for index, ids in pending.lookups]

    def load(self, parts: list[tuple]) -> None:
        for index, ids, values in parts:
            self.tables[index].load(ids.to(self.device), values)

    # -- what the consistency policy asks of a store (policy.py) ------------------------

    def apply_now(self, channel: RowChannel, push: RowPush) -> None:
        for index, ids, grads in push.tables:  # a table listed without rows here still takes a step
            self.tables[index].update(ids.to(self.device), grads.to(self.device))

    def accumulate(self, channel: RowChannel, accum, push: RowPush) -> None:
        accum.data = (accum.data or []) + [push]

    def apply_steps(self, steps: list) -> int:
        """Complete sync steps: per table, every worker's rows summed by id, divided by the number of
        workers that took part (rows a worker did not touch count as zero), applied once. A table
        that some worker used in the step takes a step on every server, also one that holds none of
        its rows that were touched: so its step count (SparseAdam's bias correction) is the same
        everywhere, as torch's one count per parameter."""
        for _, accum in steps:
            scale = 1.0 / len(accum.contributors)
            for index, table in self.tables.items():
                pieces = [(ids, grads) for push in accum.data or () for i, ids, grads in push.tables if i == index]
                if not pieces:
                    continue  # nobody used the table in this step: as torch skips a None gradient
                ids, grads = rowhash.summed(torch.cat([p[0] for p in pieces]), torch.cat([p[1] for p in pieces]))
                table.update(ids.to(self.device), grads.to(self.device).mul_(scale))
        return len(steps)

    # -- checkpoints and counters --------------------------------------------------------

    def snapshot(self) -> dict:
        if self.channel is None:
            return {}
        return {"tables": {self.tables[i].spec.name: t.snapshot() for i, t in self.tables.items()},
                "clocks": list(self.channel.clocks), "version": self.channel.version}

    def restore(self, saved: dict) -> None:
        if self.channel is None:
            return
        for table in self.tables.values():
            table.restore(saved["tables"][table.spec.name])
        self.channel.clocks, self.channel.version = list(saved["clocks"]), int(saved["version"])
        self.channel.accums.clear()
        self.channel.broken = None

    def counters(self) -> dict:
        return {t.spec.name: {"rows": t.rows, "evictions": t.evictions, "admissions": t.admissions,
                              "over_capacity": t.over_capacity, "step": t.step}
                for t in self.tables.values()}


def _area_reader(lane: Lane, request: P.RowRequest):
    cursor = lane.row_cursor(ROW_PULLS if isinstance(request, P.PullRows) else ROW_PUSHES)

    def take(expected: int, dtype: torch.dtype, what: str) -> torch.Tensor:
        try:
            return cursor.take(expected, dtype).clone()
        except ConfigError as exc:
            raise P.Rejected(P.BAD_REQUEST, f"{what}: {exc}") from None
    return take


__all__ = ["RowChannel", "RowPending", "RowPush", "RowStore"]
