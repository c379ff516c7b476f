"""A restarted server brings the whole job back to the newest checkpoint.

A server that died loses what it applied since the last checkpoint. Restoring only its own shards
from there would leave the model a mix of two steps; so every server reloads the same checkpoint,
and the job's rollback epoch moves on. Servers refuse requests of an earlier epoch (and fail the
pulls that waited) with a ``RolledBackError`` that names the step; workers hear of the epoch with
their heartbeats, fail what they still waited for the same way, and go on from that step
(``ps.DistributedOptimizer`` pulls the restored values and carries on by itself).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Optional

from .. import checkpoint
from .. import protocol as P
from .roster import LIVE, Node, Roster

log = logging.getLogger("psframework.scheduler")

Send = Callable[[bytes, P.Message], None]


class Rollback:
    def __init__(self, roster: Roster, send: Send, checkpoint_dir: Callable[[], Optional[str]]):
        self.roster = roster
        self._send = send
        self._checkpoint_dir = checkpoint_dir
        self.epoch = 0  # how many times the job went back to a checkpoint
        self.step = 0  # the step it last went back to
        self._loading: set[int] = set()  # servers that have not reloaded yet
        self._restarted: list[Node] = []  # published once every server has reloaded
        self._directory: Optional[Path] = None
        self._from_step = 0  # the most steps a live worker had reported when the job went back

    def start(self, restarted: Node) -> Optional[str]:
        """A restarted server has its blocks: every server reloads the newest checkpoint. Returns why
        that is impossible, or None."""
        root = self._checkpoint_dir()
        found = checkpoint.find_latest(Path(root)) if root else None
        if found is None:
            return f"restarted, but there is no complete checkpoint under {root} to restore the job from"
        self._directory, manifest = found
        self.epoch += 1
        self.step = int(manifest["step"])
        # now, before the workers hear of it and count from the checkpoint's step; never below that
        # step (a worker that joined late counts its own pushes only)
        reported = [int(n.stats.get("steps", 0)) for n in self.roster.workers() if n.state == LIVE]
        self._from_step = max(self._from_step, self.step, *reported)
        self._restarted.append(restarted)
        for rank in range(self.roster.config.num_servers):
            name = f"server-{rank}.pt"
            self._send(self.roster.server(rank).identity,
                       P.Load(path=str(self._directory / name), sha256=manifest["files"][name]["sha256"],
                              rollback=self.epoch, step=self.step))
            self._loading.add(rank)
        return None

    def on_loaded(self, server: Node) -> bool:
        """A server reloaded; False if it was not for a rollback."""
        if server.rank not in self._loading:
            return False
        self._loading.discard(server.rank)
        if self._loading:
            return True
        for node in self._restarted:
            node.state = LIVE
            node.last_seen = time.monotonic()
            self.roster.publish(node)
        names = ", ".join(f"server {n.rank}" for n in self._restarted)
        newest, self._restarted, self._from_step = self._from_step, [], 0
        log.warning("the job rolled back %d steps, from about step %d to step %d: %s restarted, and every server "
                    "reloaded %s", newest - self.step, newest, self.step, names, self._directory.name)
        return True


__all__ = ["Rollback"]
