"""Collectives: barriers, checkpoints and restores that every live worker takes part in, and the
checkpoint directory a restarted server reloads from (``rollback.py``).

A collective starts once every live worker has reached it; ``recheck`` runs on every arrival and
whenever a worker leaves or dies, so a departed worker never holds the others back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

from .. import checkpoint
from .. import protocol as P
from ..errors import PSError
from ..metrics import Recorder
from .roster import LIVE, Node, Roster

log = logging.getLogger("psframework.scheduler")

Send = Callable[[bytes, P.Message], None]
WorkerPart = Union[P.Checkpoint, P.Restore]


@dataclass
class _StorageOp:
    """A checkpoint or restore in progress: the waiting workers and the servers not done yet."""

    kind: type
    waiting: dict[int, tuple[bytes, WorkerPart]]
    directory: Path
    step: int
    pending: set[int] = field(default_factory=set)
    files: dict[str, dict] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)


class Collectives:
    def __init__(self, roster: Roster, send: Send, shard_map: Callable[[], Optional[dict]],
                 optimizer: Callable[[], Optional[dict]], rollback: Callable[[], tuple[int, int]],
                 recorder: Optional[Recorder] = None):
        self.roster = roster
        self.recorder = recorder or Recorder()
        self.config = roster.config
        self._send = send
        self._shard_map = shard_map
        self._optimizer = optimizer
        self._rollback = rollback  # the job's rollback epoch and the step it went back to
        self._barriers: dict[int, dict[int, bytes]] = {}  # seq -> worker -> its peer
        self.barrier_seq_done = 0
        self._collecting: dict[type, dict[int, tuple[bytes, WorkerPart]]] = {P.Checkpoint: {}, P.Restore: {}}
        self._storage: Optional[_StorageOp] = None
        self._last_directory: Optional[str] = None

    # -- barriers and the workers' parts -------------------------------------------------

    def on_barrier(self, peer: bytes, message: P.Barrier) -> None:
        node = self.roster.live_node("worker", message.rank, peer)
        self._barriers.setdefault(message.seq, {})[node.rank] = peer
        self.recheck()

    def on_worker_part(self, peer: bytes, message: WorkerPart) -> None:
        """A worker's part of a checkpoint or restore."""
        node = self.roster.live_node("worker", message.rank, peer)
        what = type(message).__name__.lower()
        if self._shard_map() is None:
            raise P.Rejected(P.CHECKPOINT_ERROR, f"worker {node.rank}: {what} needs registered tensors; "
                                                 "call register() first")
        if self._storage is not None:
            raise P.Rejected(P.CHECKPOINT_ERROR, f"worker {node.rank}: a checkpoint operation is already running")
        epoch, step = self._rollback()
        if isinstance(message, P.Checkpoint) and message.rollback < epoch:
            raise P.Rejected(P.ROLLED_BACK, f"worker {node.rank}: the job went back to the checkpoint of step {step}; "
                                            "this checkpoint's step counts from before: go on from there",
                             rollback=epoch, step=step)
        self._collecting[type(message)][node.rank] = (peer, message)
        self.recheck()

    def recheck(self) -> None:
        """Release the barriers, and start the checkpoints, that every live worker has reached. The
        part of a worker that died meanwhile stands for nobody: not for a live one, nor for the
        process that took its rank."""
        for seq, waiting in sorted(self._barriers.items()):
            if waiting and self._all_live_in(waiting):
                for peer in waiting.values():
                    self._send(peer, P.BarrierDone(seq=seq))
                del self._barriers[seq]
                self.barrier_seq_done = max(self.barrier_seq_done, seq)
        for kind, start in ((P.Checkpoint, self._start_checkpoint), (P.Restore, self._start_restore)):
            waiting = self._collecting[kind]
            for rank, (peer, _) in list(waiting.items()):
                why = self.roster.not_counted("worker", rank, peer)
                if why:
                    del waiting[rank]
                    self._send(peer, P.Error(kind=P.PEER_LOST, message=f"the {kind.__name__.lower()} goes on without "
                                                                       f"this part: {why}"))
            if waiting and self._all_live_in({r: peer for r, (peer, _) in waiting.items()}) and self._storage is None:
                self._collecting[kind] = {}
                start(waiting)

    def _all_live_in(self, peers: dict[int, bytes]) -> bool:
        return all(peers.get(n.rank) == n.identity for n in self.roster.workers() if n.state == LIVE)

    def fail(self, message: str) -> None:
        """Answer every wait with an error: a node the job needs died."""
        for seq, waiting in self._barriers.items():
            for peer in waiting.values():
                self._send(peer, P.Error(kind=P.PEER_LOST, message=f"barrier {seq} cannot complete: {message}"))
        self._barriers.clear()
        waits = [w for w in self._collecting.values() if w] + ([self._storage.waiting] if self._storage else [])
        for waiting in waits:
            self._answer_all(waiting, P.Error(kind=P.PEER_LOST, message=f"checkpoint cannot complete: {message}"))
        self._collecting = {P.Checkpoint: {}, P.Restore: {}}
        self._storage = None

    # -- checkpoints and restores --------------------------------------------------------

    def checkpoint_dir(self) -> Optional[str]:
        return self.config.checkpoint_dir or self._last_directory

    def _start_checkpoint(self, waiting: dict[int, tuple[bytes, WorkerPart]]) -> None:
        first = waiting[min(waiting)][1]
        self._last_directory = first.directory
        step = max(part.step for _, part in waiting.values())
        directory = checkpoint.directory_for(Path(first.directory), step)
        self._storage = _StorageOp(P.Checkpoint, waiting, directory, step)
        for rank in range(self.config.num_servers):
            self._send(self.roster.server(rank).identity, P.Save(path=str(_server_file(directory, rank))))
            self._storage.pending.add(rank)

    def _start_restore(self, waiting: dict[int, tuple[bytes, WorkerPart]]) -> None:
        root = Path(waiting[min(waiting)][1].directory)
        try:
            found = checkpoint.find_latest(root)
            if found is not None:
                checkpoint.check_compatible(found[1], self._shard_map(), self.config.mode,
                                            self.config.num_servers, found[0])
        except PSError as exc:
            self._answer_all(waiting, P.Error(kind=P.CHECKPOINT_ERROR, message=str(exc)))
            return
        if found is None:
            log.info("no complete checkpoint under %s: starting afresh", root)
            self._answer_all(waiting, P.RestoreDone(step=None))
            return
        directory, manifest = found
        self._storage = _StorageOp(P.Restore, waiting, directory, int(manifest["step"]))
        for rank in range(self.config.num_servers):
            self._send(self.roster.server(rank).identity, _load_message(directory, manifest, rank))
            self._storage.pending.add(rank)

    def on_saved_or_loaded(self, server: Node, message: Union[P.Saved, P.Loaded]) -> None:
        op = self._storage
        if op is None or server.rank not in op.pending or message.path != str(_server_file(op.directory, server.rank)):
            log.info("ignored %s %s from server %d: its operation was abandoned", type(message).__name__,
                     message.path, server.rank)
            return
        op.pending.discard(server.rank)
        if isinstance(message, P.Saved):
            op.files[Path(message.path).name] = {"sha256": message.sha256, "bytes": message.bytes}
        if op.pending:
            return
        self._storage = None
        if op.kind is P.Restore:
            log.info("restored checkpoint %s (step %d)", op.directory, op.step)
            self._answer_all(op.waiting, P.RestoreDone(step=op.step, path=str(op.directory)))
            return
        checkpoint.write_manifest(op.directory, {
            "step": op.step, "mode": self.config.mode, "staleness": self.config.staleness,
            "num_servers": self.config.num_servers, "num_workers": self.config.num_workers,
            "shard_map": self._shard_map(), "optimizer": self._optimizer(), "files": op.files,
            "worker_steps": {str(r): part.step for r, (_, part) in op.waiting.items()},
            "created": time.time(),
        })
        log.info("checkpoint %s written (%d files)", op.directory, len(op.files))
        self.recorder.observe("psframework_checkpoint_seconds", time.monotonic() - op.started)
        self._answer_all(op.waiting, P.CheckpointDone(step=op.step, path=str(op.directory)))

    def on_server_error(self, server: Node, message: P.Error) -> None:
        if self._storage is None:
            raise P.Rejected(P.PROTOCOL, f"unexpected error report from server {server.rank}")
        self._abandon(f"server {server.rank} on {server.host}: {message.message}")

    def server_lost(self, server: Node) -> None:
        """A server died: a checkpoint or restore still waiting for its part can never complete."""
        op = self._storage
        if op is not None and server.rank in op.pending:
            done = "saved" if op.kind is P.Checkpoint else "loaded"
            self._abandon(f"{server} died before it {done} its shards ({server.reason}); nothing was written: "
                          "call it again once the server is back")

    def rolled_back(self) -> None:
        """The job went back to a checkpoint: a checkpoint collected or saved across that would hold the
        restored state under a later step's name (or a mix), so none is written; a restore in progress
        is overtaken by the rollback's own."""
        epoch, step = self._rollback()
        why = (f"the job went back to the checkpoint of step {step} (a server was restarted) meanwhile; "
               f"nothing was written: go on from step {step}")
        error = P.Error(kind=P.ROLLED_BACK, message=f"checkpoint abandoned: {why}", rollback=epoch, step=step)
        self._answer_all(self._collecting[P.Checkpoint], error)
        self._collecting[P.Checkpoint] = {}
        if self._storage is not None:
            self._abandon(why, P.ROLLED_BACK, rollback=epoch, step=step)

    def _abandon(self, why: str, kind: str = P.CHECKPOINT_ERROR, **extra: int) -> None:
        """End the checkpoint or restore in progress with an error for every worker in it."""
        op, self._storage = self._storage, None
        text = f"{op.kind.__name__.lower()} {op.directory.name} abandoned: {why}"
        log.error("%s", text)
        self._answer_all(op.waiting, P.Error(kind=kind, message=text, **extra))

    def _answer_all(self, waiting: dict[int, tuple[bytes, WorkerPart]], message: P.Message) -> None:
        for peer, _ in waiting.values():
            self._send(peer, message)

def _server_file(directory: Path, rank: int) -> Path:
    return directory / f"server-{rank}.pt"


def _load_message(directory: Path, manifest: dict, rank: int) -> P.Load:
    path = _server_file(directory, rank)
    return P.Load(path=str(path), sha256=manifest["files"][path.name]["sha256"])


__all__ = ["Collectives"]
