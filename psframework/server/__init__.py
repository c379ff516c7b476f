"""The server role: owns shards on its device, applies pushes, answers pulls.

A server joins the job through the scheduler, receives its blocks of the shard map, and then
serves workers directly. It is a loop over small parts:

- ``store``: the blocks' values and the optimizer over them (``DenseStore``); ``rows`` and
  ``table``: the rows of embedding tables (``RowStore``, ``Table``);
- ``policy``: the update semantics of the job's mode (``Sync``, ``Async``, ``SSP``), chosen once,
  over units (a block, or a server's table rows);
- ``requests`` and ``answers``: a worker's requests taken in, and pulls answered within credits;
- ``device``: how tensors move between the wire and the device (``HostIO``, ``CudaIO``);
- ``lanes``: the shared-memory lanes of the workers on this host; ``speakers``: who may speak
  for which worker; ``held``: device-lane pushes that came before their worker's copies landed,
  held without holding up the other workers;
- ``checkpoints``: the server's part of a checkpoint.

Run one with ``python -m psframework server`` (ps-launch does this for you).
"""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from .. import protocol as P
from ..config import NodeConfig
from ..devices import init_cuda_early, pick_server_device
from ..errors import ProtocolError, PSError
from ..logs import RateLimitedLog
from ..metrics import Recorder, stat_key
from ..node import POLL_SLICE, Membership, join_cluster
from ..optim import optimizer_from_wire
from ..security import load_secret
from ..sharding import ShardMap
from ..trace import Tracer
from ..transport import Socket, Transport, ZmqTransport
from . import checkpoints
from .answers import Answers
from .credits import ReplyCredits
from .device import DeviceIO, device_io
from .held import HeldRequests
from .lanes import ServerLanes
from .policy import Policy, policy_for
from .reads import Reads
from .requests import Requests
from .rows import RowStore
from .speakers import Speakers
from .store import DenseStore

log = logging.getLogger("psframework.server")

_DEVICE_POLL = 20e-6  # seconds between looks at the device while answers wait for it
_CREDIT_POLL = 0.005  # seconds between looks at the sends that deferred answers wait for


class Server:
    def __init__(self, config: NodeConfig, transport: Optional[Transport] = None):
        self.config = config
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self.data: Optional[Socket] = None
        self.membership: Optional[Membership] = None
        self.device = torch.device("cpu")
        self.store = DenseStore(self.device)
        self.rows = RowStore(self.device)
        self.io: Optional[DeviceIO] = None
        self.lanes: Optional[ServerLanes] = None
        self.policy: Optional[Policy] = None
        self.answers: Optional[Answers] = None
        self.requests: Optional[Requests] = None
        self.reads: Optional[Reads] = None
        self.held: Optional[HeldRequests] = None  # device-lane pushes whose copies have not landed
        self.credits = ReplyCredits(config.peer_buffer_bytes)
        self._speakers = Speakers(lambda worker: self.membership.declared_dead(worker))
        self._rollback = (0, 0)  # the job's rollback epoch and its step (scheduler/rollback.py)
        self._garbage_log = RateLimitedLog(log)
        self._busy_s = 0.0  # in the loop but not waiting in poll: handling requests, waiting for the device
        self.recorder, self.tracer = Recorder(), Tracer(config.trace_dir, config.trace_steps)  # metrics, trace.py

    # -- lifecycle -----------------------------------------------------------------------

    def serve(self) -> int:
        """Join the job and serve until the scheduler says stop. Returns the exit code."""
        try:
            self.data = self.transport.listen(self.config.bind_host, 0,
                                              max_message_bytes=self.config.max_message_bytes)
            init_cuda_early(self.config.device)
            self.membership = join_cluster(self.transport, self.config, role="server", address=self.data.address)
            self.tracer.start("server", self.membership.rank)
            self._place()
            log.info("server %d serving on %s, shards on %s", self.membership.rank, self.data.address, self.device)
            return self._loop()
        except PSError as exc:
            log.error("server stopping: %s", exc)
            return 1
        finally:
            self.close()

    def _place(self) -> None:
        """Choose our device and build the parts that depend on it and on the mode."""
        m = self.membership
        requested = m.welcome.server_device or self.config.device
        gpus = torch.cuda.device_count() if requested != "cpu" else 0
        self.device = torch.device(pick_server_device(requested, m.rank, m.servers, gpus))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.store, self.rows = DenseStore(self.device, self.recorder, self.tracer), RowStore(self.device)
        self.io = device_io(self.data, self.device, self.tracer)
        self.lanes = ServerLanes(self.io, self.device)
        self.policy = policy_for(m.mode, m, self._units, self.io.on_gpu, lambda: self.store.nbytes, self.recorder)
        self.answers = Answers(self.data, self.io, self.lanes, self.rows, self.policy, self.credits, m.rank,
                               self.recorder, self.tracer)
        self.requests = Requests(self.data, self.io, self.lanes, self.store, self.rows, self.policy, self.answers,
                                 m.num_workers, m.rank, self._check_rollback, self.recorder, self.tracer)
        self.reads = Reads(self.data, self.store, self.rows, self.answers)
        self.held = HeldRequests(self.data, self.lanes, self.requests, self._speakers)
        m.stats_source = self._metrics
        self._speakers.know(m.welcome.worker_keys)
        self._speakers.know_reader_key(m.welcome.reader_key)

    def close(self) -> None:
        if self.io is not None:
            self.io.close()
        if self.lanes is not None:
            self.lanes.close()
        self.store.close()
        for state in self.store.blocks.values():
            state.trackers.clear()
        if self.membership is not None:
            self.membership.close()
            self.membership = None
        if self.data is not None:
            self.data.close()
            self.data = None
        self.tracer.close()
        if self._own_transport:
            self.transport.close()
            self._own_transport = False

    def _units(self) -> list:
        """Everything with a clock that workers push to (policy.py): the blocks, and the row channel."""
        units = list(self.store.blocks.values())
        return units + [self.rows.channel] if self.rows.channel is not None else units

    def _check(self) -> None:
        self.membership.check(peers=False)

    def _loop(self) -> int:
        membership = self.membership
        while True:
            ready = self.transport.poll([self.data, membership.socket], self._poll_timeout())
            started = time.perf_counter()
            if membership.socket in ready:
                for message in membership.receive():
                    self._on_control(message)
            if self.data in ready:
                self._drain_data()
            self.held.release()
            if self._waiting and not ready:
                self._await_device_or_request()
            if membership.shutdown_requested:
                log.info("server %d: job finished, %d updates applied", membership.rank, self.store.applied)
                return 0
            if membership.peers_changed:
                self.answers.ready(self.policy.peers_changed())
                gone = membership.gone_workers()
                self.answers.fail_impossible(self._units(), gone)
                self.io.flush(wait=True)
                self.lanes.forget(set(gone) | membership.departed_workers)
            self.answers.release_deferred()
            self._check()
            self._busy_s += time.perf_counter() - started

    def _metrics(self) -> dict:
        """This server's metrics for its heartbeats (read on the heartbeat thread)."""
        stats = {**self.recorder.stats(), "psframework_server_pushes": self.policy.pushes,
                 "psframework_server_updates": self.store.applied,
                 "psframework_server_queue_depth": sum(len(u.pulls) for u in self._units()) + self.credits.deferred}
        for table, counts in self.rows.counters().items():
            for what in ("rows", "evictions", "admissions"):
                stats[stat_key(f"psframework_table_{what}", table)] = counts[what]
        return stats

    def _poll_timeout(self) -> float:
        if self._waiting:
            return 0
        return _CREDIT_POLL if self.credits.waiting else POLL_SLICE

    @property
    def _waiting(self) -> bool:
        """Answers wait for device work, or complete steps for their uploads."""
        return self.io.waiting or self.policy.waiting or self.held.waiting

    def _await_device_or_request(self) -> None:
        """Apply the steps whose uploads have landed and send the answers whose device work is
        done, until a request comes in or nothing waits (at most one poll slice). Blocking on the
        device instead would hold back the next request, whose upload could run beside the
        copies that the answers wait for."""
        deadline = time.monotonic() + POLL_SLICE
        while self._waiting and time.monotonic() < deadline:
            self.held.release()
            self._apply_due()
            self.io.flush(wait=False)
            if self.transport.poll([self.data], 0):
                return
            if not self.held.spinning:
                time.sleep(_DEVICE_POLL)
        self.io.flush(wait=False)

    def _drain_data(self) -> None:
        # bounded so heartbeats keep flowing under a flood of requests
        for _ in range(256):
            if not self.transport.poll([self.data], 0):
                break
            self._handle_one()
            self.io.flush(wait=False)
            if self.policy.waiting:
                # a step is complete: apply and answer it now, so that its workers copy the values
                # out while we sum the next block (the policy still batches GPU shards)
                self._apply_due()
        self._apply_due()

    def _apply_due(self) -> None:
        self.answers.ready(self.policy.apply_due())

    # -- control messages from the scheduler ----------------------------------------------

    def _on_control(self, message: P.Message) -> None:
        if isinstance(message, P.Setup):
            self._setup(message)
        elif isinstance(message, P.Save):
            self.membership.send(checkpoints.save(self.store, self.rows, message))
        elif isinstance(message, P.Load):
            answer = checkpoints.load(self.store, self.rows, message)
            if isinstance(answer, P.Loaded):
                self.policy.reset()
                if message.rollback > self._rollback[0]:
                    self._roll_back(message.rollback, message.step)
            self.membership.send(answer)
        elif isinstance(message, P.Activate):
            self._activate(message)

    def _setup(self, message: P.Setup) -> None:
        shard_map = ShardMap.from_wire(message.shard_map)
        rank, workers = self.membership.rank, self.membership.num_workers
        blocks = self.store.setup(shard_map, rank, optimizer_from_wire(message.optimizer), workers)
        self.rows.setup(shard_map, rank, workers)
        self.io.setup(blocks)
        self.membership.send(P.SetupDone(blocks=len(blocks)))
        log.info("server %d holds %d blocks, %.1f MiB, and rows of %d tables", rank, len(blocks),
                 self.store.nbytes / 2**20, len(self.rows.tables))

    def _activate(self, message: P.Activate) -> None:
        """A worker joined late: it takes part from each unit's current step on."""
        self.membership.rejoined(message.worker, message.epoch)
        self._speakers.know({message.worker: message.key})
        self.policy.joined_late(message.worker)
        for unit in self._units():
            unit.clocks[message.worker] = self.policy.start_clock(unit, message.worker)
        self.membership.send(P.Activated(worker=message.worker))

    def _roll_back(self, epoch: int, step: int) -> None:
        """Every server went back to the checkpoint of ``step``: what waited belongs to later steps."""
        self._rollback = (epoch, step)
        self.answers.rollback = epoch
        self.answers.fail_all(self._units(), self._rolled_back_error())

    def _check_rollback(self, epoch: int) -> None:
        if epoch < self._rollback[0]:
            raise self._rolled_back_error()

    def _rolled_back_error(self) -> P.Rejected:
        epoch, step = self._rollback
        return P.Rejected(P.ROLLED_BACK, f"server {self.membership.rank} was restarted and the job went back to "
                                         f"the checkpoint of step {step}; go on from there", rollback=epoch, step=step)

    # -- requests ------------------------------------------------------------------------

    def _handle_one(self) -> None:
        try:
            peer, head = self.data.recv_header()
        except ProtocolError as exc:
            self.data.skip_rest()
            self._garbage_log.warning("dropped a message without a header: %s", exc)
            return
        try:
            message = P.decode(head)
        except ProtocolError as exc:
            self.data.skip_rest()
            self._garbage_log.warning("dropped a malformed message from peer %r: %s", peer, exc)
            self._send(peer, P.Error(kind=P.PROTOCOL, message=str(exc), req=P.request_id(head)))
            return
        try:
            if not self.held.take(peer, message, bare=not self.data.more()):
                self._dispatch(peer, message)
        except P.Rejected as exc:
            self.data.skip_rest()
            self._garbage_log.warning("rejected %s from %r: %s", type(message).__name__, peer, exc)
            if self._speakers.speaks_for(peer, getattr(message, "rank", None)):
                self.lanes.refused(message)
            self._send(peer, exc.reply(getattr(message, "req", None)))

    def _send(self, peer: bytes, message: P.Message) -> None:
        self.data.send([P.encode(message)], peer=peer)

    def _dispatch(self, peer: bytes, message: P.Message) -> None:
        if isinstance(message, P.Introduce):
            self.data.skip_rest()
            self._speakers.introduce(peer, message)
            return
        if isinstance(message, P.IntroduceReader):
            self.data.skip_rest()
            self._speakers.introduce_reader(peer, message)
            return
        if isinstance(message, (P.Read, P.ReadRows)):
            read = self.reads.on_read if isinstance(message, P.Read) else self.reads.on_read_rows
            read(peer, self._speakers.reader(peer, message), message)
            return
        self._speakers.check(peer, message)
        if isinstance(message, P.BlockRequest):
            self.requests.on_block(peer, message)
        elif isinstance(message, P.RowRequest):
            self.requests.on_rows(peer, message)
        elif isinstance(message, P.Mark):
            self.data.skip_rest()
            if 0 <= message.rank < self.membership.num_workers:
                self.answers.fail(self.policy.went_on(message.rank, message.step))
        elif isinstance(message, P.Stats):
            self.data.skip_rest()
            self._send(peer, P.StatsReply(req=message.req, counters=self.counters()))
        elif isinstance(message, P.MapExports):
            self.data.skip_rest()
            self._send(peer, self.lanes.map_exports(message, self.membership.rank))
        elif isinstance(message, (P.Attach, P.AttachDevice)):
            self.data.skip_rest()
            blocks = [(b.block.block_id, b.block.nbytes) for b in self.store.blocks.values()]
            workers, rank = self.membership.num_workers, self.membership.rank
            if isinstance(message, P.AttachDevice):
                self._send(peer, self.lanes.attach_device(message, blocks, workers, rank))
                return
            self.lanes.attach(message, blocks, workers, rank)
            self._send(peer, self.lanes.attached(message, self.store, self.policy.shares_values, rank))
        else:
            raise P.Rejected(P.PROTOCOL, f"a server does not handle {type(message).__name__} messages")

    def counters(self) -> dict:
        """What ``Worker.server_stats()`` reports."""
        return {"applied": self.store.applied, "pushes": self.policy.pushes, "blocks": len(self.store.blocks),
                "device": str(self.device), **self.lanes.counters(), "reads": self.reads.count,
                "waiting_reads": self.reads.waiting(),
                "apply_bursts": 0, "timed_applies": 0, "deferred_replies": self.credits.deferrals,
                "dropped_replies": self.data.dropped, "tables": self.rows.counters(), "busy_s": self._busy_s,
                "push_bytes": self.io.push_bytes, "pull_bytes": self.answers.pull_bytes,
                **self.held.counters(), **self.policy.counters()}


def main(config: NodeConfig) -> int:
    return Server(config).serve()


__all__ = ["Server", "main"]
