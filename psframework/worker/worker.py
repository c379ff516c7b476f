"""``Worker``: the member of a job that trains; the API a training loop uses."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, Callable, Optional

import torch

from .. import protocol as P
from ..compress import Codec
from ..config import NodeConfig, node_config_from_env
from ..datapath.compression import Compression, CompressionArg
from ..datapath.lane import shm_available
from ..devices import init_cuda_early
from ..errors import ClosedError, ConfigError, PSError, PSTimeoutError, RegistrationError, RolledBackError
from ..metrics import Recorder
from ..node import Membership, join_cluster
from ..optim import OptimizerSpec
from ..security import load_secret
from ..sharding import ShardMap, TensorSpec
from ..trace import Tracer
from ..transport import Transport, ZmqTransport
from .checks import TensorsLike, as_dict, check_dense, check_tensor, table_specs_of
from .exchange import Exchange, send_whole
from .lanes import WorkerLanes
from .plans import ExchangePlans, PackedBlock, packed_names
from .requests import Client, Future
from .rows import RowClient, RowsFuture
from .staging import DeviceStaging

log = logging.getLogger("psframework.worker")


def _traced(tracer: Tracer, started: float, exchange: Exchange, step: int) -> Exchange:
    """Trace an exchange from ``started`` (before it was built) until every answer is in (``trace.py``)."""
    if tracer.wants(step):
        name = exchange.op.__name__
        exchange.future.on_complete(lambda: tracer.complete(name, started, "exchange", step=step))
    return exchange


def _from_membership(name: str) -> property:
    return property(lambda self: getattr(self.membership, name), doc=f"The job's {name}, from the scheduler.")


class Worker:
    """A member of the job that trains. Create it with ``ps.init()``.

    Workers talk to the servers directly: every request is sent to all servers it concerns before
    any answer is awaited. Tensor frames are zero-copy slices of the caller's tensors, and pulled
    values are received straight into the caller's tensors. A Worker is used from one thread.
    """

    def __init__(self, config: NodeConfig, transport: Optional[Transport] = None):
        self.config = config
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self._closed = False
        self.membership: Optional[Membership] = None
        self.client: Optional[Client] = None
        self.lanes: Optional[WorkerLanes] = None
        self.staging, self.compression = DeviceStaging(), Compression()  # compression: planned by register()
        self.recorder, self.tracer = Recorder(), Tracer(config.trace_dir, config.trace_steps)  # metrics, trace.py
        init_cuda_early(None)  # the training loop's tensors may well be on a GPU
        try:
            self.membership = join_cluster(self.transport, config, role="worker")
            self.client = Client(self.transport, self.membership, config.max_message_bytes,
                                 self.recorder, self.tracer)
            self.tracer.start("worker", self.membership.rank, step=0)
            self.membership.stats_source = lambda: {**self.recorder.stats(), "psframework_worker_steps": self.steps}
        except BaseException:
            self.close()
            raise
        self.shard_map: Optional[ShardMap] = None
        self.plans: Optional[ExchangePlans] = None  # what exchanges of the same tensors share
        self.rows: Optional[RowClient] = None
        self._specs: dict[str, TensorSpec] = {}
        self._registered: dict[str, torch.Tensor] = {}
        self._barrier_seq = 0
        self.steps = 0  # pushes and push_pulls completed; the default step number of a checkpoint
        self._push_steps = 0  # pushes and push_pulls started: numbers each push (see server/steps.py)
        self._rollback_listeners: list[Callable[[int], None]] = []

    # -- identity ------------------------------------------------------------------------

    rank = _from_membership("rank")
    num_workers = _from_membership("num_workers")
    num_servers = _from_membership("num_servers")
    mode = _from_membership("mode")
    staleness = _from_membership("staleness")

    def __repr__(self) -> str:
        if self.membership is None:
            return "<Worker (not joined)>"
        return f"<Worker rank={self.rank}/{self.num_workers} mode={self.mode}>"

    # -- registration --------------------------------------------------------------------

    def register(self, params: TensorsLike, optimizer: Optional[OptimizerSpec] = None, *,
                 tables: Optional[Mapping[str, Any]] = None, sparse_optimizer: Optional[OptimizerSpec] = None,
                 compression: CompressionArg = None, pull_compression: Optional[Codec] = None) -> None:
        """Collective: every worker registers the same tensors; afterwards all hold rank 0's values.

        ``tables``: embedding tables, name -> a ``ps.nn.Embedding``/``EmbeddingBag`` (or its
        ``table_spec()``); their rows live on the servers only (``pull_rows``, ``push_rows``), updated
        by the table's own ``optimizer=`` or ``sparse_optimizer``."""
        self._check_open()
        if self.shard_map is not None:
            raise RegistrationError("register() was already called on this worker; it may be called once")
        if not isinstance(optimizer, OptimizerSpec):
            raise ConfigError("register() needs optimizer=, e.g. ps.optim.SGD(lr=0.1)")
        tensors = as_dict(params, "register()")
        table_specs = table_specs_of(tables or {}, sparse_optimizer)
        if not tensors and not table_specs:
            raise ConfigError("register() got no tensors and no tables")
        check_dense(tensors, optimizer)
        specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
        self.compression = Compression.plan(specs, compression, pull_compression, self.config)  # README: compression
        reply = self.membership.request(
            P.Register(rank=self.rank, tensors=[P.TensorInfo(s.name, list(s.shape), s.dtype) for s in specs],
                       optimizer=optimizer.to_wire(), tables=[t.to_wire() for t in table_specs.values()],
                       device_lanes=_offers_device_lanes(self.config, self.membership.welcome, tensors)),
            expect=P.Registered)
        self.shard_map = ShardMap.from_wire(reply.shard_map)
        self._specs, self._registered = {s.name: s for s in specs}, tensors
        self.plans = ExchangePlans(self.shard_map, tensors)
        self.lanes = WorkerLanes(self.client, self.rank, self.shard_map, self.staging.synchronize,
                                 self.config.cuda_ipc and self.membership.welcome.server_device != "cpu",
                                 self.config.row_lane_bytes if self.shard_map.tables else 0, self.config.direct_paths)
        self.client.on_server_moved = self.lanes.renew
        self.client.on_rolled_back = self._rolled_back
        self.rows = RowClient(self)
        if reply.joined:
            # a worker that joined a running elastic job: take the current values, skip the start-up
            self._barrier_seq = reply.barrier_seq
        else:
            if self.rank == reply.initialiser:
                if tensors:
                    self._send(P.Init, tensors, None).wait()
                self.rows.load_pretrained(tables or {})
            self.barrier()
        if tensors:
            _pull_through_rollbacks(self, tensors)
        if self.config.shm and shm_available():
            devices = [t.device for t in tensors.values() if t.is_cuda]
            self.lanes.attach_all(range(self.num_servers), devices[0] if devices else None)

    # -- rows of embedding tables ------------------------------------------------------------

    def pull_rows(self, table: str, ids: torch.Tensor, train: bool = True) -> RowsFuture:
        """The rows of ``ids`` (int64, any shape, repeats allowed) of an embedding table; ``wait()``
        returns them, shaped ``ids.shape + (dim,)``, on the host. ``train=False`` never creates a row:
        unknown ids read as their initial value."""
        self._require_registered("pull_rows")
        return self.rows.pull({table: ids}, train=train, single=True)

    def push_rows(self, table: str, ids: torch.Tensor, grads: torch.Tensor) -> Future:
        """Push the gradients of rows (``grads``: one row of ``dim`` per id); the gradients of a
        repeated id are summed before they are sent. Applied by the job's mode, like ``push``."""
        self._require_registered("push_rows")
        return self.rows.push({table: (ids, grads)})

    # -- data path -----------------------------------------------------------------------

    def push(self, grads: TensorsLike) -> Future:
        """Send gradients; the servers apply them by the job's mode. Returns a Future.

        A gradient may be None: no gradient this step (like a ``p.grad`` that is None). In sync
        mode it counts as zero in the mean over the workers, and a tensor that no worker has a
        gradient for is not stepped at all (momentum, weight decay and Adam's state stay as they
        are), exactly as torch.optim skips a None gradient."""
        return self.counted(self._send(P.Push, as_dict(grads, "push()", allow_none=True), None))

    def pull(self, tensors: TensorsLike) -> Future:
        """Copy the current values into these tensors (once the mode allows). Returns a Future."""
        return self._send(P.Pull, None, as_dict(tensors, "pull()"))

    def push_pull(self, grads: TensorsLike, into: TensorsLike, *, device_ordered: bool = False) -> Future:
        """Push gradients (None: no gradient, see ``push``), then receive the updated values into
        ``into`` (same names). ``device_ordered``: GPU values through device lanes are copied behind
        the servers' writes on the GPU, the current streams after them; if all were, the future's
        ``ordered_on_device`` is True: go on before ``wait()``, which only reports errors then."""
        grads, dest = as_dict(grads, "push_pull()", allow_none=True), as_dict(into, "push_pull(into=)")
        missing = [k for k in grads if k not in dest]
        if missing:
            raise ConfigError(f"push_pull(): no destination tensor in into= for {missing[:5]}")
        return self.counted(self._send(P.PushPull, grads, {k: dest[k] for k in grads}, device_ordered))

    def counted(self, future: Future) -> Future:
        """Count a step once every server has it (a step lost in flight to a dead server is not done)."""
        def done() -> None:
            self.recorder.tick("psframework_worker_step_seconds")
            self.steps = self.tracer.step = self.steps + 1
            self.membership.stats = {"steps": self.steps}  # heartbeats report it, for rollback reports

        future.on_complete(done)
        return future

    def check_tensor(self, name: str, tensor: torch.Tensor, what: str) -> None:
        """``BadRequestError`` unless ``tensor`` matches what ``name`` was registered with."""
        check_tensor(self._specs, name, tensor, what)

    def _send(self, op: type, sources: Optional[dict], dests: Optional[dict], device_ordered: bool = False,
              packed: Optional[dict[int, PackedBlock]] = None) -> Future:
        self._require_registered(op.__name__.lower())
        names = list(sources if sources is not None else dests)
        if sources is not None:  # every tensor is checked before anything is sent
            _check_all(self, sources, names, op.__name__.lower(), packed)
        return send_whole(self.exchange(op, names, dests, device_ordered=device_ordered, packed=packed), sources)

    def exchange(self, op: type, names: list[str], dests: Optional[dict], *, after_caller: bool = True, epoch:
                 Optional[int] = None, device_ordered: bool = False, packed: Optional[dict] = None) -> Exchange:
        """Start an exchange (``op``: ``P.Push``, ``P.Pull``, ``P.PushPull``, ``P.Init``) of ``names``;
        its sources are added one by one. With ``after_caller=False``, copies into GPU destinations
        are ordered only after the events given to ``add``, not after all the work queued on the
        caller's current stream. ``epoch``: the rollback epoch its sources were computed in
        (``RolledBackError`` if the job went back since; default: now). ``device_ordered``: see
        ``push_pull``; ``packed``: see ``push_pull_packed``. For ``DistributedOptimizer``; a training
        loop uses push and pull."""
        self._require_registered(op.__name__.lower())
        self.lanes.check_device_work()  # before the exchange takes a step number
        if epoch is not None:
            self.client.same_epoch(epoch)  # before it takes a step number: a dropped step takes none
        if dests is not None:
            _check_all(self, dests, names, f"{op.__name__.lower()} destination", packed)
        step = self.next_push_step() if op in (P.Push, P.PushPull) else -1
        exchange = Exchange(self, op, names, dests, step=step, after_caller=after_caller, epoch=epoch,
                            device_ordered=device_ordered, packed=packed)
        return _traced(self.tracer, self.tracer.now_us(), exchange, self.steps)

    def next_push_step(self) -> int:
        """The number of the pushing step that starts now (see server/steps.py)."""
        step, self._push_steps = self._push_steps, self._push_steps + 1
        return step

    def progress(self, timeout: float) -> None:
        """Take in the replies that arrive within ``timeout`` seconds."""
        self.client.progress(timeout)

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, directory: str, step: Optional[int] = None) -> str:
        """Collective: snapshot every shard, the optimizer state and the clocks under ``directory``.

        Every worker calls it at the same point (in sync mode: after the same step). Requests
        still in flight are completed first, so the snapshot holds the same pushes everywhere.
        Returns the checkpoint's directory (``directory/step-NNNNNNNN``).
        """
        self._require_registered("save_checkpoint")
        self.client.wait_all()
        part = P.Checkpoint(rank=self.rank, directory=str(directory), step=self.steps if step is None else int(step),
                            rollback=self.client.rollback)  # steps count from the last rollback this client drew
        return self.membership.request(part, expect=P.CheckpointDone).path

    def load_checkpoint(self, directory: str) -> Optional[int]:
        """Collective: restore the newest complete checkpoint under ``directory`` on every server and
        pull it into the registered tensors. Returns its step, or None if there is none yet."""
        self._require_registered("load_checkpoint")
        self.client.wait_all()
        reply = self.membership.request(P.Restore(rank=self.rank, directory=str(directory)), expect=P.RestoreDone)
        if reply.step is None:
            return None
        self.pull(self._registered).wait()
        self.steps = self._push_steps = reply.step
        self.membership.stats = {"steps": self.steps}
        return self.steps

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Block until every live worker reached the same barrier."""
        self._check_open()
        self._barrier_seq += 1
        self.membership.request(P.Barrier(rank=self.rank, seq=self._barrier_seq), expect=P.BarrierDone,
                                timeout=timeout)

    def server_stats(self) -> list[dict]:
        """Counters of every server, by rank: ``applied`` updates, ``pushes`` received, ``blocks``
        held, its ``device``, the workers with ``lanes`` and the ``lane_requests`` they made,
        ``apply_bursts`` (optimizer steps over complete sync blocks; on a GPU several blocks go in
        one) of which ``timed_applies`` went out because the blocks had waited 5 ms,
        ``deferred_replies`` and ``dropped_replies`` (credits, high-water marks), ``reads`` by readers
        and the ``waiting_reads`` that wait for a version, and ``tables``:
        per embedding table its ``rows``, ``evictions``, ``admissions`` and ``step``."""
        self._check_open()
        return self.client.stats()

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this worker is closed; create a new one with ps.init()")

    def _require_registered(self, what: str) -> None:
        self._check_open()
        if self.shard_map is None:
            raise ConfigError(f"{what}: call register() first")

    def close(self, timeout: float = 10.0) -> None:
        """Leave the job: wait (up to ``timeout`` seconds) for the answers to every request sent,
        so that nothing pushed is lost; fail the futures of those that did not come; tell the
        scheduler this worker is done; release every socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._drain(timeout)
            if self.membership is not None:
                self.membership.request(P.Bye(rank=self.rank, steps=self.steps), expect=P.ByeAck, timeout=5.0)
        except PSError as exc:
            log.debug("worker close: %s", exc)
        finally:
            if self.client is not None:
                self.client.close()
            if self.lanes is not None:
                self.lanes.close()
            if self.membership is not None:
                self.membership.close()
            self.tracer.close()
            if self._own_transport:
                self.transport.close()
                self._own_transport = False

    def on_rollback(self, listener: Callable[[int], None]) -> None:
        """Call ``listener(step)`` whenever the job goes back to the checkpoint of ``step``."""
        self._rollback_listeners.append(listener)

    def _rolled_back(self, step: int) -> None:
        self.steps = self._push_steps = step
        self.membership.stats = {"steps": self.steps}
        for listener in self._rollback_listeners:
            listener(step)

    def _drain(self, timeout: float) -> None:
        if self.client is None or not self.client.pending:
            return
        try:
            self.client.wait_all(timeout)
        except PSError as exc:
            log.warning("worker %d: closing with %d requests unanswered: %s", self.rank, len(self.client.pending), exc)
            self.client.fail_pending(str(exc))

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def push_pull_packed(worker: Worker, grads: dict, into: dict, packed: dict[int, PackedBlock], *,
                     device_ordered: bool = False) -> Future:
    """``push_pull`` of ``DistributedOptimizer``'s gradients and parameters (``into`` holds a
    destination for every name of ``grads``), the blocks of ``packed`` each as one region each
    way; their tensors are views of the registered ones' layout (``worker/flat.py``) and are not
    checked one by one."""
    return worker.counted(worker._send(P.PushPull, grads, into, device_ordered, packed))


def _check_all(worker: Worker, tensors: dict, names: list[str], what: str,
               packed: Optional[dict[int, PackedBlock]]) -> None:
    """Check the tensors of ``names`` (not those of ``packed`` blocks, nor None) against their keys."""
    unchecked = packed_names(packed)
    for name in names:
        if tensors[name] is not None and name not in unchecked:
            worker.check_tensor(name, tensors[name], what)


def _offers_device_lanes(config: NodeConfig, welcome: P.Welcome, tensors: dict) -> bool:
    """Whether a worker will offer the GPU servers of its host device lanes (``WorkerLanes.attach_all``)."""
    return bool(tensors) and all(t.is_cuda for t in tensors.values()) and config.cuda_ipc and config.shm and \
        shm_available() and welcome.server_device != "cpu"


def _pull_through_rollbacks(worker: Worker, tensors: dict[str, torch.Tensor]) -> None:
    """register()'s pull of the current values. The job may go back to a checkpoint meanwhile (a
    server was restarted): that fails the pull, after the registration itself is done, so the
    restored values are pulled again here (each refusal teaches the client a later rollback epoch),
    until ``start_timeout``."""
    deadline = time.monotonic() + worker.config.start_timeout
    while True:
        try:
            worker.pull(tensors).wait()
            return
        except RolledBackError as exc:
            if time.monotonic() > deadline:
                raise PSTimeoutError(
                    f"worker {worker.rank}: register() could not pull the current values within "
                    f"{worker.config.start_timeout} s: the job kept going back to checkpoints (last to step "
                    f"{exc.step}); check the servers' output for why they keep restarting") from exc
            log.warning("worker %d: the job went back to step %d during register(); pulling its values again",
                        worker.rank, exc.step)


def init(scheduler: Optional[str] = None, *, rank: Optional[int] = None, timeout: Optional[float] = None,
         secret_file: Optional[str] = None, transport: Optional[Transport] = None) -> Worker:
    """Join the job as a worker. Under ps-launch every setting comes from ``PS_*`` variables;
    keyword arguments override them (``secret_file``: the job secret of an authenticated job).

    >>> worker = ps.init(scheduler="tcp://127.0.0.1:9091")   # doctest: +SKIP
    """
    config = node_config_from_env(scheduler=scheduler, rank=rank, start_timeout=timeout, secret_file=secret_file)
    return Worker(config, transport=transport)


__all__ = ["Worker", "init"]
