"""Read a job's values while it trains: ``ps.Reader``.

A reader joins with the job's secret like any node but is no member of the job: it never counts in
steps, barriers or elastic membership, and may come and go at any time (``scheduler/readers.py``).
It reads blocks straight from the servers; a server answers a read from its values between two
updates, so no block is ever torn (``server/reads.py``).

>>> with ps.Reader(scheduler="tcp://host:9091", secret_file="job.secret") as reader:  # doctest: +SKIP
...     version = reader.snapshot({"fc.weight": weight})
...     for version in reader.watch(model, every=5.0):
...         serve(model)

In sync mode a snapshot is consistent: every tensor in it reflects the same number of steps (its
version). It reads every block, then reads again the blocks that are behind the newest, each
answered as soon as its server has applied that step. In async and ssp mode there is no such
step: a snapshot's version counts the updates applied to the blocks it read, and says so.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Iterator, Mapping, Optional

import torch

from . import protocol as P
from . import rowhash
from .buffers import dtype_name, host_copy, host_tensor
from .config import node_config_from_env
from .node import await_welcome
from .errors import ConfigError, PeerLostError, PSTimeoutError, RolledBackError
from .reading import ServerLinks
from .security import load_secret
from .sharding import ShardMap
from .transport import Transport, ZmqTransport
from .worker.rows import as_ids

log = logging.getLogger("psframework.reader")


class SnapshotVersion(int):
    """What ``Reader.snapshot`` returns. In sync mode (``consistent``) the number of steps that
    every tensor of the snapshot reflects; in async and ssp mode the number of updates applied
    to the blocks read, summed. ``tensors``: the updates each tensor reflects (the fewest of its
    blocks')."""

    consistent: bool
    tensors: dict[str, int]

    def __new__(cls, value: int, consistent: bool, tensors: dict[str, int]) -> "SnapshotVersion":
        version = super().__new__(cls, value)
        version.consistent, version.tensors = consistent, tensors
        return version

    def __repr__(self) -> str:
        return f"SnapshotVersion({int(self)}, consistent={self.consistent})"


class Reader:
    """Read-only access to a running job's values (see the module's docstring).

    ``scheduler`` and ``secret_file`` default to the ``PS_*`` variables ps-launch and LocalCluster
    set; ``timeout``: how long to wait for the scheduler's welcome and for any one read."""

    def __init__(self, scheduler: Optional[str] = None, *, secret_file: Optional[str] = None,
                 timeout: Optional[float] = None, transport: Optional[Transport] = None):
        self.config = node_config_from_env(scheduler=scheduler, secret_file=secret_file, start_timeout=timeout)
        self.timeout = self.config.start_timeout
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(self.config.secret_file))
        self.links: Optional[ServerLinks] = None
        try:
            welcome = self._hello()
            self.mode = welcome.mode
            self.shard_map = ShardMap.from_wire(welcome.shard_map)
            self.links = ServerLinks(self.transport, welcome,
                                     min(self.config.max_message_bytes, welcome.max_message_bytes or 1 << 62))
        except BaseException:
            self.close()
            raise
        self._buckets = torch.tensor(self.shard_map.buckets, dtype=torch.int64)

    @property
    def reader(self) -> int:
        """This reader's id in the job (a new one after the servers moved)."""
        return self.links.reader if self.links is not None else -1

    def __repr__(self) -> str:
        return f"Reader({self.reader}, scheduler={self.config.scheduler!r}, mode={self.mode})"

    # -- joining -------------------------------------------------------------------------

    def _hello(self) -> P.ReaderWelcome:
        """Say hello to the scheduler; its welcome comes once the job's tensors are registered."""
        sock = self.transport.connect(self.config.scheduler, max_message_bytes=self.config.max_message_bytes)
        try:
            sock.send([P.encode(P.Hello(role="reader", host=self.config.host, pid=os.getpid(), version=P.VERSION))])
            welcome = await_welcome(self.transport, sock, P.ReaderWelcome, self.timeout,
                                    f"this reader on {self.config.host}")
            if welcome is not None:
                return welcome
            raise PSTimeoutError(
                f"reader on {self.config.host}: the scheduler at {self.config.scheduler} did not welcome it within "
                f"{self.timeout:g} s: is the job running, and have its workers registered their tensors? (a reader "
                "is welcomed once they have; a job that is over no longer answers)")
        finally:
            sock.close()

    def _refresh(self) -> bool:
        """Ask the scheduler again where the servers are (a restarted server moves); True if one moved."""
        try:
            welcome = self._hello()
        except PSTimeoutError as exc:
            raise PeerLostError(f"reader {self.reader}: a server stopped answering and the scheduler at "
                                f"{self.config.scheduler} does not answer either: the job is over or lost ({exc})") from None
        return self.links.move(welcome)

    # -- dense tensors -------------------------------------------------------------------

    def snapshot(self, tensors: Mapping[str, torch.Tensor], timeout: Optional[float] = None) -> SnapshotVersion:
        """Fill ``tensors`` (registered name -> a tensor of its shape and dtype, on any device) with
        the job's current values; returns their version (``SnapshotVersion``)."""
        plan = self._plan(tensors)
        versions = self._retrying(lambda deadline: self._consistent_read(plan, deadline), timeout)
        return self._version(tensors, versions)

    def _retrying(self, read, timeout: Optional[float]):
        """``read(deadline)``, read again from the start where the job went back to a checkpoint
        meanwhile, or a server did not answer because it moved (a restarted server)."""
        wait = self.timeout if timeout is None else timeout
        for _ in range(3):
            try:
                return read(time.monotonic() + wait)
            except RolledBackError as exc:
                log.warning("reader %d: reading again from the start: %s", self.reader, exc)
            except PSTimeoutError:
                if not self._refresh():
                    raise
        raise PSTimeoutError(f"reader {self.reader}: no answer in three attempts (the job went back to a checkpoint, "
                             "or its servers moved, each time)")

    def _plan(self, tensors: Mapping[str, torch.Tensor]) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Block -> (segment index, where its values go) for every piece of ``tensors``."""
        plan: dict[int, list[tuple[int, torch.Tensor]]] = {}
        specs = {spec.name: spec for spec in self.shard_map.tensors}
        for name, tensor in tensors.items():
            spec = specs.get(name)
            if spec is None:
                known = ", ".join(list(specs)[:8])
                raise ConfigError(f"snapshot(): {name!r} is not registered in this job (registered: {known}...)")
            if tuple(tensor.shape) != tuple(spec.shape) or dtype_name(tensor.dtype) != spec.dtype:
                raise ConfigError(f"snapshot(): {name!r} is registered as {spec.dtype} {tuple(spec.shape)}, "
                                  f"got a tensor of {dtype_name(tensor.dtype)} {tuple(tensor.shape)}")
            if not tensor.is_contiguous():
                raise ConfigError(f"snapshot(): the tensor for {name!r} must be contiguous")
            flat = tensor.detach().view(-1)
            for block, index, seg in self.shard_map.pieces_of(name):
                plan.setdefault(block.block_id, []).append((index, flat[seg.offset:seg.offset + seg.numel]))
        return plan

    def _consistent_read(self, plan, deadline: float) -> dict[int, int]:
        """Read every block of ``plan``; in sync mode read again the blocks behind the newest, each
        once it has caught up, until all are at one version."""
        epochs: set[int] = set()
        versions = self._read(plan, dict.fromkeys(plan, 0), deadline, epochs)
        while self.mode == "sync" and len(set(versions.values())) > 1:
            newest = max(versions.values())
            behind = {block: newest for block, version in versions.items() if version < newest}
            versions.update(self._read({block: plan[block] for block in behind}, behind, deadline, epochs))
        if len(epochs) > 1:  # some blocks were read before a rollback, some after: two histories
            raise RolledBackError(f"reader {self.reader}: the job went back to a checkpoint during the snapshot")
        return versions

    def _read(self, plan, at_least: dict[int, int], deadline: float, epochs: set[int]) -> dict[int, int]:
        """One read of each block of ``plan`` (at its version ``at_least``), answers written in place."""
        reads = []
        for block_id, pieces in plan.items():
            block = self.shard_map.blocks[block_id]  # ids are indices (ShardMap checks)
            reads.append((block.server, P.Read(req=0, block=block_id, segs=[i for i, _ in pieces],
                                               at_least=at_least[block_id]),
                          [], _write_into([dest for _, dest in pieces]), f"block {block_id}"))
        answers = self.links.exchange(reads, deadline)
        epochs.update(answer.rollback for answer in answers)
        return {block_id: answer.version for block_id, answer in zip(plan, answers)}

    def _version(self, tensors, versions: dict[int, int]) -> SnapshotVersion:
        per_tensor = {name: min(versions[block.block_id] for block, _, _ in self.shard_map.pieces_of(name))
                      for name in tensors}
        if self.mode == "sync":
            step = next(iter(versions.values()), 0)
            return SnapshotVersion(step, True, per_tensor)
        return SnapshotVersion(sum(versions.values()), False, per_tensor)

    def versions(self, timeout: Optional[float] = None) -> dict[int, int]:
        """Each block's version now (a cheap read of no values)."""
        reads = [(block.server, P.Read(req=0, block=block.block_id, segs=[]), [], _write_into([]),
                  f"block {block.block_id}") for block in self.shard_map.blocks]
        answers = self._retrying(lambda deadline: self.links.exchange(reads, deadline), timeout)
        return {block.block_id: answer.version for block, answer in zip(self.shard_map.blocks, answers)}

    def watch(self, model: torch.nn.Module, every: float = 5.0,
              timeout: Optional[float] = None) -> Iterator[SnapshotVersion]:
        """Refresh ``model``'s registered parameters and buffers in place whenever the job's values
        changed, checking every ``every`` seconds; yields each new version (the first at once)."""
        tensors = self._module_tensors(model)
        last: Optional[dict[int, int]] = None
        while True:
            now = self.versions(timeout)
            if now != last:
                with torch.no_grad():
                    version = self.snapshot(tensors, timeout)
                last = now
                yield version
            time.sleep(every)

    def _module_tensors(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        registered = {spec.name for spec in self.shard_map.tensors}
        tensors = {name: t for name, t in [*model.named_parameters(), *model.named_buffers()] if name in registered}
        if not tensors:
            names = ", ".join(name for name, _ in list(model.named_parameters())[:4])
            raise ConfigError(f"watch(): none of the model's parameters ({names}...) is registered in this job "
                              f"(registered: {', '.join(sorted(registered)[:4])}...); pass the model the job trains")
        return tensors

    # -- tables --------------------------------------------------------------------------

    def lookup(self, table: str, ids: torch.Tensor, timeout: Optional[float] = None) -> torch.Tensor:
        """The current rows of ``ids`` (any shape) in embedding table ``table``: shape
        ``(*ids.shape, dim)``, float32 on the host. Never creates a row: an id the table does not
        hold gets its initial row."""
        index = self.shard_map.table_index(table)
        spec = self.shard_map.tables[index]
        flat = as_ids(spec, ids, self.config.max_message_bytes)
        unique, inverse = torch.unique(flat, return_inverse=True)
        rows = torch.empty(unique.numel(), spec.dim)
        servers = self._buckets[rowhash.bucket_of(unique)] if unique.numel() else unique
        mine = [(server, (servers == server).nonzero().reshape(-1)) for server in range(self.shard_map.num_servers)]

        def read(deadline: float):  # built at each attempt: a refresh gives this reader a new id
            reads = [(server, P.ReadRows(req=0, rank=self.reader, tables=[index], counts=[where.numel()]),
                      [unique[where].contiguous()], _rows_into(rows, where), f"rows of table {table!r}")
                     for server, where in mine if where.numel()]
            return self.links.exchange(reads, deadline)
        self._retrying(read, timeout)
        return rows[inverse].reshape(*ids.shape, spec.dim)

    # -- the end -------------------------------------------------------------------------

    def close(self) -> None:
        if self.links is not None:
            self.links.close()
            self.links = None
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _write_into(dests: list[torch.Tensor]):
    """An answer's frames, one per destination, copied into them."""
    def take(frames: list) -> None:
        if len(frames) != len(dests):
            raise ValueError(f"{len(frames)} frames for {len(dests)} segments")
        for dest, frame in zip(dests, frames):
            values = host_tensor(frame, dest.dtype).view(dest.shape)
            if dest.device.type == "cpu":
                host_copy(dest, values)  # a memcpy: torch's copy_ would spin up its intra-op threads
            else:
                dest.copy_(values)
    return take


def _rows_into(rows: torch.Tensor, where: torch.Tensor):
    """An answer's one frame of rows, put in ``rows`` at ``where``."""
    def take(frames: list) -> None:
        if len(frames) != 1:
            raise ValueError(f"{len(frames)} frames for the rows of one table")
        rows[where] = host_tensor(frames[0], torch.float32).view(where.numel(), rows.shape[1])
    return take


__all__ = ["Reader", "SnapshotVersion"]
