"""The worker role: the client that a training loop uses to push gradients and pull weights.

>>> import psframework as ps                                     # doctest: +SKIP
>>> with ps.init() as worker:                                     # doctest: +SKIP
...     worker.register(model.named_parameters(), optimizer=ps.optim.SGD(lr=0.1))
...     loss.backward()
...     worker.push_pull({n: p.grad for n, p in model.named_parameters()},
...                      into=dict(model.named_parameters())).wait()

Workers talk to the servers directly: every request is sent to all servers it concerns before
any answer is awaited. Tensor frames are zero-copy slices of the caller's tensors, and pulled
values are received straight into the caller's tensors. A Worker is used from one thread.

Tensors on a GPU travel through pinned host buffers that the worker keeps per key and reuses:
gradients are copied into them on a copy stream of the worker and each block goes on the wire as
soon as its copy has landed; pulled values are copied on to the device block by block as they
arrive. ``Future.wait()`` orders the caller's current CUDA stream after those copies, so work
queued on that stream afterwards sees the new values.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Union

import torch

from . import protocol as P
from .config import NodeConfig, node_config_from_env
from .errors import (BadRequestError, ClosedError, ConfigError, PSError, PSTimeoutError, ProtocolError,
                     RegistrationError, error_from_reply)
from .node import POLL_SLICE, Membership, join_cluster
from .optim import OptimizerSpec
from .buffers import byte_view, dtype_name, host_copy
from .devices import Staging, init_cuda_early
from .shm import Lane, lane_name, shm_available
from .sharding import Block, Segment, ShardMap, TensorSpec
from .security import load_secret
from .transport import Socket, Transport, ZmqTransport

log = logging.getLogger("psframework.worker")

TensorsLike = Union[Mapping[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]


def _as_dict(tensors: TensorsLike, what: str) -> dict[str, torch.Tensor]:
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    result: dict[str, torch.Tensor] = {}
    for item in items:
        try:
            name, tensor = item
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a mapping or (name, tensor) pairs; got item {item!r}") from None
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise ConfigError(f"{what}: expected (str, Tensor), got ({type(name).__name__}, {type(tensor).__name__})")
        if name in result:
            raise ConfigError(f"{what}: name {name!r} appears twice")
        result[name] = tensor
    return result


@dataclass
class _Request:
    future: "Future"
    server: int = -1
    reply: Optional[dict] = None  # the answer's header (kept for STATS)
    frames: list = field(default_factory=list)  # kept to resend if the server is restarted
    # where each reply frame lands, and what to do once it did (copy it on to a GPU)
    dest: list[tuple[memoryview, Optional[Callable[[], None]]]] = field(default_factory=list)
    keep: list = field(default_factory=list)  # tensors whose memory is on the wire or receives into
    # through a shared-memory lane: the block whose slots it holds, and the copies out of its pull slot
    lane_block: Optional[int] = None
    lane_copies: list["_LaneCopy"] = field(default_factory=list)


class Future:
    """The pending result of push, pull or push_pull. ``wait()`` returns once every server answered."""

    def __init__(self, worker: "Worker"):
        self._worker = worker
        self._outstanding = 0
        self._error: Optional[PSError] = None
        self._finalizers: list[Callable[[], None]] = []
        self._on_complete: Optional[Callable[[], None]] = None
        self._copy_streams: dict[torch.device, "torch.cuda.Stream"] = {}  # that copied onto GPUs

    def done(self) -> bool:
        return self._outstanding == 0

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until complete; raises the first error any server reported, or PeerLostError."""
        self._worker._wait_until(self.done, timeout)
        finalizers, self._finalizers = self._finalizers, []
        if self._error is not None:
            raise self._error
        for finalize in finalizers:
            finalize()
        self._order_streams()

    def _order_streams(self) -> None:
        """Make the calling thread's current CUDA streams wait for this request's copies to GPUs."""
        for device, stream in self._copy_streams.items():
            torch.cuda.current_stream(device).wait_stream(stream)

    def _resolve(self, error: Optional[PSError] = None) -> None:
        self._outstanding -= 1
        if error is not None and self._error is None:
            self._error = error
        if self._outstanding == 0 and self._error is None and self._on_complete is not None:
            self._on_complete()


class Worker:
    """A member of the job that trains. Create it with ``ps.init()``."""

    def __init__(self, config: NodeConfig, transport: Optional[Transport] = None):
        self.config = config
        self._own_transport = transport is None
        self.transport = transport or ZmqTransport(secret=load_secret(config.secret_file))
        self._closed = False
        self.membership: Optional[Membership] = None
        self._servers: list[Socket] = []
        self._lanes: dict[int, Lane] = {}  # shared-memory lanes to the servers on this host, by rank
        init_cuda_early(None)  # the training loop's tensors may well be on a GPU
        try:
            self.membership = join_cluster(self.transport, config, role="worker")
            self._servers = [self.transport.connect(a, max_message_bytes=config.max_message_bytes)
                             for a in self.membership.servers]
        except BaseException:
            self.close()
            raise
        self._req_ids = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        # per device and direction ("push": device to host, "pull": host to device), so that the two
        # directions of PCIe run at once instead of queueing behind each other
        self._copy_streams: dict[tuple[torch.device, str], torch.cuda.Stream] = {}
        # pinned host buffers for tensors on GPUs, per key: what is pushed from, what is pulled into
        self._push_staging: dict[str, Staging] = {}
        self._pull_staging: dict[str, Staging] = {}
        self._barrier_seq = 0
        self.shard_map: Optional[ShardMap] = None
        self._specs: dict[str, TensorSpec] = {}
        self._registered: dict[str, torch.Tensor] = {}
        self.steps = 0  # pushes and push_pulls completed; the default step number of a checkpoint
        self._layout: dict[str, list[tuple[Block, int, Segment]]] = {}

    # -- identity ------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.membership.rank

    @property
    def num_workers(self) -> int:
        return self.membership.num_workers

    @property
    def num_servers(self) -> int:
        return self.membership.num_servers

    @property
    def mode(self) -> str:
        return self.membership.mode

    @property
    def staleness(self) -> int:
        return self.membership.staleness

    def __repr__(self) -> str:
        if self.membership is None:
            return "<Worker (not joined)>"
        return f"<Worker rank={self.rank}/{self.num_workers} mode={self.mode}>"

    # -- registration --------------------------------------------------------------------

    def register(self, params: TensorsLike, optimizer: Optional[OptimizerSpec] = None) -> None:
        """Collective: every worker registers the same tensors; afterwards all hold rank 0's values."""
        self._check_open()
        if self.shard_map is not None:
            raise RegistrationError("register() was already called on this worker; it may be called once")
        if not isinstance(optimizer, OptimizerSpec):
            raise ConfigError("register() needs optimizer=, e.g. ps.optim.SGD(lr=0.1)")
        tensors = _as_dict(params, "register()")
        if not tensors:
            raise ConfigError("register() got no tensors")
        for name, t in tensors.items():
            if not t.is_floating_point():
                raise ConfigError(f"tensor {name!r} has dtype {dtype_name(t.dtype)}; only floating tensors can be "
                                  "registered (server optimizers need them)")
        specs = [TensorSpec.of(name, t) for name, t in tensors.items()]
        reply = self.membership.request(
            {"op": P.REGISTER, "role": "worker", "rank": self.rank,
             "tensors": [s.to_wire() for s in specs], "optimizer": optimizer.to_wire()},
            expect=P.REGISTERED)
        self.shard_map = ShardMap.from_wire(reply["shard_map"])
        self._specs = {s.name: s for s in specs}
        self._registered = tensors
        self._layout = {s.name: [] for s in specs}
        for block in self.shard_map.blocks:
            for i, seg in enumerate(block.segments):
                self._layout[seg.key].append((block, i, seg))
        if reply.get("joined"):
            # a worker that joined a running elastic job: take the current values, skip the start-up
            self._barrier_seq = int(reply.get("barrier_seq", 0))
        else:
            if self.rank == 0:
                self._send(P.INIT, tensors, None).wait()
            self.barrier()
        self.pull(tensors).wait()
        if self.config.shm and shm_available():
            self._attach_lanes(range(self.num_servers))

    def _attach_lanes(self, servers: Iterable[int]) -> None:
        """Offer each server a shared-memory lane; those on this host map it, the others refuse."""
        offers = []
        for server in servers:
            blocks = self._blocks_for_lane(server)
            if not blocks:
                continue
            try:
                lane = Lane.create(lane_name(self.rank, server), blocks)
            except OSError as exc:
                log.warning("worker %d: no shared-memory lanes (%s); using the sockets only", self.rank, exc)
                break
            offers.append((server, lane, self._request_attach(server, lane)))
        for server, lane, future in offers:
            try:
                future.wait(timeout=30)
            except PSError as exc:
                log.debug("worker %d: server %d takes no lane: %s", self.rank, server, exc)
                lane.close()
                continue
            lane.path.unlink(missing_ok=True)  # both have it mapped; no name left to leak
            self._lanes[server] = lane
            devices = {t.device for t in self._registered.values() if t.is_cuda}
            if devices:
                lane.pin(next(iter(devices)))
        if offers:
            log.info("worker %d: shared-memory lanes to servers %s", self.rank, sorted(self._lanes))

    def _blocks_for_lane(self, server: int) -> list[tuple[int, int]]:
        return [(b.block_id, b.nbytes) for b in self.shard_map.blocks_of_server(server)]

    def _request_attach(self, server: int, lane: Lane) -> "Future":
        future = Future(self)
        req = next(self._req_ids)
        request = _Request(future, server=server)
        request.frames.append(P.pack_header({"op": P.ATTACH, "req": req, "rank": self.rank,
                                             "path": str(lane.path), "token": lane.token}))
        self._submit(request, req)
        return future

    def _submit(self, request: _Request, req: int, track: bool = False):
        """Send a request's frames to its server and await its answer as ``req``; returns the tracker."""
        self._pending[req] = request
        request.future._outstanding += 1
        return self._servers[request.server].send(request.frames, check=self.membership.check, track=track)

    # -- data path -----------------------------------------------------------------------

    def push(self, grads: TensorsLike) -> Future:
        """Send gradients; the servers apply them by the job's mode. Returns a Future."""
        return self._counted(self._send(P.PUSH, _as_dict(grads, "push()"), None))

    def pull(self, tensors: TensorsLike) -> Future:
        """Copy the current values into these tensors (once the mode allows). Returns a Future."""
        return self._send(P.PULL, None, _as_dict(tensors, "pull()"))

    def push_pull(self, grads: TensorsLike, into: TensorsLike) -> Future:
        """Push gradients, then receive the updated values into ``into`` (same names)."""
        grads = _as_dict(grads, "push_pull()")
        dest = _as_dict(into, "push_pull(into=)")
        missing = [k for k in grads if k not in dest]
        if missing:
            raise ConfigError(f"push_pull(): no destination tensor in into= for {missing[:5]}")
        return self._counted(self._send(P.PUSH_PULL, grads, {k: dest[k] for k in grads}))

    def _counted(self, future: Future) -> Future:
        """Count a step once every server has it (a step lost in flight to a dead server is not done)."""
        def done() -> None:
            self.steps += 1
            self.membership.stats = {"steps": self.steps}  # heartbeats report it, for rollback reports

        future._on_complete = done
        return future

    def _check_tensor(self, name: str, tensor: torch.Tensor, what: str) -> None:
        spec = self._specs.get(name)
        if spec is None:
            known = ", ".join(list(self._specs)[:8])
            raise BadRequestError(f"{what}: unknown key {name!r}; registered keys include: {known}")
        if tuple(tensor.shape) != spec.shape:
            raise BadRequestError(f"{what}: key {name!r} has shape {tuple(tensor.shape)} but was registered "
                                  f"with shape {spec.shape}")
        if dtype_name(tensor.dtype) != spec.dtype:
            raise BadRequestError(f"{what}: key {name!r} has dtype {dtype_name(tensor.dtype)} but was registered "
                                  f"with dtype {spec.dtype}")

    def _send(self, op: str, sources: Optional[dict], dests: Optional[dict]) -> Future:
        self._check_registered(op)
        names = list(sources if sources is not None else dests)
        if sources is not None:
            for name in names:  # every tensor is checked before anything is sent
                self._check_tensor(name, sources[name], op)
        exchange = self._exchange(op, names, dests)
        if sources is not None:
            for name in names:
                exchange.add(name, sources[name])
        exchange.send_ready(wait=True)
        return exchange.future

    def _check_registered(self, op: str) -> None:
        self._check_open()
        if self.shard_map is None:
            raise ConfigError(f"{op}: call register() first")

    def _exchange(self, op: str, names: list[str], dests: Optional[dict], *,
                  after_caller: bool = True) -> "_Exchange":
        """Start an exchange of ``names``; its sources are added one by one. With
        ``after_caller=False``, copies into GPU destinations are ordered only after the events
        given to ``add``, not after all the work queued on the caller's current stream."""
        self._check_registered(op)
        if dests is not None:
            for name in names:
                self._check_tensor(name, dests[name], f"{op} destination")
        return _Exchange(self, op, names, dests, after_caller=after_caller)

    def _copy_stream(self, device: torch.device, direction: str) -> "torch.cuda.Stream":
        stream = self._copy_streams.get((device, direction))
        if stream is None:
            stream = self._copy_streams[(device, direction)] = torch.cuda.Stream(device)
        return stream

    @staticmethod
    def _staging(pool: dict[str, Staging], name: str, tensor: torch.Tensor) -> Staging:
        nbytes = tensor.numel() * tensor.element_size()
        staging = pool.get(name)
        if staging is None or staging.nbytes != nbytes:
            staging = pool[name] = Staging(nbytes)
        return staging

    def _progress(self, timeout: float) -> None:
        """Receive the replies that arrive within ``timeout`` seconds (after a liveness check)."""
        self.membership.check()
        for sock in self.transport.poll(self._servers, timeout):
            self._drain(sock)

    def _wait_until(self, done: Callable[[], bool], timeout: Optional[float]) -> None:
        """Receive replies until ``done()``; every slice checks that the job's nodes still live."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            self._follow_moved_servers()
            if deadline is not None and time.monotonic() > deadline:
                raise PSTimeoutError(f"worker {self.rank}: request not answered within {timeout} s")
            self._progress(POLL_SLICE)

    def _follow_moved_servers(self) -> None:
        """A restarted server listens at a new address: reconnect and resend what it never answered."""
        for rank, address in self.membership.moved_servers().items():
            log.warning("worker %d: server %d restarted at %s; resending %d requests", self.rank, rank, address,
                        sum(1 for r in self._pending.values() if r.server == rank))
            self._servers[rank].close()
            self._servers[rank] = self.transport.connect(address, max_message_bytes=self.config.max_message_bytes)
            resend = [r for r in self._pending.values() if r.server == rank]
            if rank in self._lanes:
                self._renew_lane(rank)  # its attach goes first on the socket, so the resent requests find it
            for request in resend:
                self._servers[rank].send(request.frames, check=self.membership.check)

    def _renew_lane(self, server: int) -> None:
        """The new process of a restarted server gets a fresh lane with the old one's push area
        (requests in flight still have their gradients there)."""
        for stream in self._copy_streams.values():
            stream.synchronize()  # copies into the old push area have landed
        old = self._lanes.pop(server)
        lane = Lane.create(lane_name(self.rank, server), self._blocks_for_lane(server))
        lane.copy_push_area(old)
        if old.pinned:
            lane.pin()
        old.close()
        self._lanes[server] = lane
        future = self._request_attach(server, lane)
        future._on_complete = lambda: lane.path.unlink(missing_ok=True)

    def _drain(self, sock: Socket) -> None:
        while self.transport.poll([sock], 0):
            self._receive_reply(sock)

    def _receive_reply(self, sock: Socket) -> None:
        _, head = sock.recv_header()
        try:
            header = P.unpack_header(head)
        except ProtocolError as exc:
            sock.skip_rest()
            log.warning("worker %d dropped a malformed reply from %s: %s", self.rank, sock.address, exc)
            return
        request = self._pending.pop(header.get("req"), None)
        if request is None:
            sock.skip_rest()
            return
        if header["op"] == P.ERROR:
            sock.skip_rest()
            self._release_lane(request, copies=False)
            request.future._resolve(error_from_reply(header))
            return
        request.reply = header
        error = None
        if request.lane_block is not None:
            sock.skip_rest()
            if header["op"] == P.VALUES and not header.get("shm"):
                error = ProtocolError(f"reply from {sock.address} came over the socket for a lane request")
            self._release_lane(request, copies=error is None and header["op"] == P.VALUES)
        elif header["op"] == P.VALUES:
            for view, landed in request.dest:
                got = sock.recv_into(view) if sock.more() else -1
                if got != len(view):
                    error = ProtocolError(f"reply from {sock.address} had a frame of {got} bytes, expected {len(view)}")
                elif landed is not None:
                    landed()
        sock.skip_rest()
        request.future._resolve(error)

    def _release_lane(self, request: _Request, copies: bool) -> None:
        """Copy a lane reply out of its pull slot (if ``copies``) and free the block's slots."""
        if request.lane_block is None:
            return
        lane = self._lanes.get(request.server)
        if lane is None:
            return
        to_devices: dict["torch.cuda.Stream", tuple[list, list]] = {}
        for copy in request.lane_copies if copies else ():
            source = _lane_piece(lane.pull_slot, copy.block, copy.seg, copy.target.dtype)
            if copy.stream is None:
                host_copy(copy.target, source)
            else:
                targets, sources = to_devices.setdefault(copy.stream, ([], []))
                targets.append(copy.target)
                sources.append(source)
        copied = []
        for stream, (targets, sources) in to_devices.items():
            # one call for the block's segments: a Python copy_ each cost ~20 us, which added up
            # to a millisecond for a block of many small tensors at the end of a step
            with torch.cuda.stream(stream):
                torch._foreach_copy_(targets, sources, non_blocking=True)
            copied.append(torch.cuda.Event())
            copied[-1].record(stream)
        lane.release(request.lane_block, copied)

    # -- checkpoints ---------------------------------------------------------------------

    def save_checkpoint(self, directory: str, step: Optional[int] = None) -> str:
        """Collective: snapshot every shard, the optimizer state and the clocks under ``directory``.

        Every worker calls it at the same point (in sync mode: after the same step). Requests
        still in flight are completed first, so the snapshot holds the same pushes everywhere.
        Returns the checkpoint's directory (``directory/step-NNNNNNNN``).
        """
        self._require_registered("save_checkpoint")
        self._wait_all()
        reply = self.membership.request(
            {"op": P.CHECKPOINT, "role": "worker", "rank": self.rank, "directory": str(directory),
             "step": self.steps if step is None else int(step)}, expect=P.CHECKPOINT_DONE)
        return reply["path"]

    def load_checkpoint(self, directory: str) -> Optional[int]:
        """Collective: restore the newest complete checkpoint under ``directory`` on every server and
        pull it into the registered tensors. Returns its step, or None if there is none yet."""
        self._require_registered("load_checkpoint")
        self._wait_all()
        reply = self.membership.request(
            {"op": P.RESTORE, "role": "worker", "rank": self.rank, "directory": str(directory)},
            expect=P.RESTORE_DONE)
        if reply.get("step") is None:
            return None
        self.pull(self._registered).wait()
        self.steps = int(reply["step"])
        self.membership.stats = {"steps": self.steps}
        return self.steps

    def _require_registered(self, what: str) -> None:
        self._check_open()
        if self.shard_map is None:
            raise ConfigError(f"{what}: call register() first")

    def _wait_all(self) -> None:
        self._wait_until(lambda: not self._pending, None)

    def barrier(self, timeout: Optional[float] = None) -> None:
        """Block until every live worker reached the same barrier."""
        self._check_open()
        self._barrier_seq += 1
        self.membership.request({"op": P.BARRIER, "role": "worker", "rank": self.rank,
                                 "seq": self._barrier_seq}, expect=P.BARRIER_DONE, timeout=timeout)

    def server_stats(self) -> list[dict]:
        """Counters of every server, by rank: ``applied`` updates, ``pushes`` received, ``blocks``
        held, its ``device``, the workers with ``lanes`` and the ``lane_requests`` they made, and
        ``apply_bursts`` (optimizer steps over complete sync blocks; on a GPU several blocks go in
        one) of which ``timed_applies`` went out because the blocks had waited 5 ms."""
        self._check_open()
        future = Future(self)
        requests = []
        for rank in range(len(self._servers)):
            req = next(self._req_ids)
            requests.append(_Request(future, server=rank))
            requests[-1].frames.append(P.pack_header({"op": P.STATS, "req": req}))
            self._submit(requests[-1], req)
        future.wait()
        return [request.reply for request in requests]

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this worker is closed; create a new one with ps.init()")

    def close(self) -> None:
        """Leave the job: tell the scheduler this worker is done, then release every socket."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.membership is not None:
                self.membership.request({"op": P.BYE, "role": "worker", "rank": self.rank},
                                        expect=P.BYE_ACK, timeout=5.0)
        except PSError as exc:
            log.debug("worker close: %s", exc)
        finally:
            for sock in self._servers:
                sock.close()
            self._servers = []
            for lane in self._lanes.values():
                lane.close()
            self._lanes = {}
            if self.membership is not None:
                self.membership.close()
            if self._own_transport:
                self.transport.close()
                self._own_transport = False

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Exchange:
    """One push, pull or push_pull, sent block by block as its sources are added.

    A block goes out once every source in it was added and, for a source on a GPU, its copy into
    the worker's pinned buffer for that key has landed. Sources in host memory go out zero-copy and
    host destinations receive in place; destinations on a GPU receive into the worker's pinned
    buffer for the key, and each block's values are copied on to the device as soon as they arrive.
    A block whose server has a shared-memory lane to this worker, with the block's slots free, goes
    through the lane instead: sources are copied into its push slot (straight from the GPU, for a
    GPU tensor), only the header is sent, and the values are copied out of its pull slot.
    """

    def __init__(self, worker: Worker, op: str, names: list[str], dests: Optional[dict], *,
                 after_caller: bool = True):
        self.worker = worker
        self.op = op
        self.future = Future(worker)
        self._blocks: dict[int, tuple[Block, list[tuple[int, Segment, str]]]] = {}
        for name in names:
            for block, i, seg in worker._layout[name]:
                self._blocks.setdefault(block.block_id, (block, []))[1].append((i, seg, name))
        for _, parts in self._blocks.values():
            parts.sort(key=lambda part: part[0])
        self._missing = {block_id: len(parts) for block_id, (_, parts) in self._blocks.items()}
        self._sources: dict[str, Optional[torch.Tensor]] = {}  # flat host tensors (None: all in lanes)
        self._from_device: set[str] = set()  # sources copied from a GPU (already in their lane slots)
        self._staged: dict[str, Staging] = {}
        self._landed: dict[int, list] = {}  # block -> events of its copies from GPUs
        self._keep: list[torch.Tensor] = []  # device tensors read by copies that may be in flight
        self._ready: deque[int] = deque()  # blocks whose sources are all added, oldest first
        self._unsent_to: dict[int, int] = {}  # blocks not yet sent, by server
        for block, _ in self._blocks.values():
            self._unsent_to[block.server] = self._unsent_to.get(block.server, 0) + 1
        self._lane_blocks: dict[int, Lane] = {}
        self._ordered: set[tuple[torch.device, str]] = set()  # copy streams already after the caller's
        if worker._lanes and op != P.INIT:
            for block_id, (block, _) in self._blocks.items():
                lane = worker._lanes.get(block.server)
                if lane is not None and lane.reserve(block_id):
                    self._lane_blocks[block_id] = lane
        self._dests = ({name: self._destination(name, dests[name], after_caller) for name in names}
                       if dests is not None else {})
        if op == P.PULL:
            self._ready.extend(self._blocks)

    @property
    def sent_blocks(self) -> int:
        return len(self._blocks) - sum(self._unsent_to.values())

    @property
    def all_sent(self) -> bool:
        return not any(self._unsent_to.values())

    def add(self, name: str, tensor: torch.Tensor, after: Optional["torch.cuda.Event"] = None) -> None:
        """Hand over the source tensor for ``name``. For a tensor on a GPU, its copy to the host
        waits for ``after`` (default: for the work queued so far on the caller's current stream)."""
        if name in self._sources:
            raise ConfigError(f"{self.op}: {name!r} was given twice")
        self.worker._check_tensor(name, tensor, self.op)
        layout = self.worker._layout[name]
        if tensor.device.type == "cpu":
            flat = tensor.detach().contiguous().reshape(-1)
        else:
            flat = self._copy_from_device(name, tensor, layout, after)
            self._from_device.add(name)
        self._sources[name] = flat
        for block, _, _ in layout:
            self._missing[block.block_id] -= 1
            if self._missing[block.block_id] == 0:
                self._ready.append(block.block_id)

    def _copy_from_device(self, name: str, tensor: torch.Tensor, layout: list, after) -> Optional[torch.Tensor]:
        """Start the copies of a GPU tensor's blocks to the host: into their lane's push slot, or
        into the key's pinned staging buffer, which is returned (None if every block has a lane)."""
        worker, device = self.worker, tensor.device
        flat = None
        if any(block.block_id not in self._lane_blocks for block, _, _ in layout):
            staging = worker._staging(worker._push_staging, name, tensor)
            staging.wait(worker.membership.check)  # earlier sends from it have left
            self._staged[name] = staging
            flat = staging.typed(tensor.dtype)
        stream = worker._copy_stream(device, "push")
        if after is not None:
            stream.wait_event(after)
        else:
            self._after_caller(stream, device, "push")
        with torch.cuda.stream(stream):
            source = tensor.detach()
            source = (source if source.is_contiguous() else source.contiguous()).view(-1)
            for block, _, seg in layout:
                end = seg.offset + seg.numel
                lane = self._lane_blocks.get(block.block_id)
                target = flat[seg.offset:end] if lane is None else _lane_piece(lane.push_slot, block, seg, tensor.dtype)
                target.copy_(source[seg.offset:end], non_blocking=True)
            landed = torch.cuda.Event()  # one per tensor: recording events costs more than the small copies
            landed.record(stream)
        for block, _, _ in layout:
            self._landed.setdefault(block.block_id, []).append(landed)
        self._keep.append(source)
        return flat

    def _after_caller(self, stream: "torch.cuda.Stream", device: torch.device, direction: str) -> None:
        """Order a copy stream after the work queued so far on the caller's stream (once per exchange)."""
        if (device, direction) not in self._ordered:
            self._ordered.add((device, direction))
            stream.wait_stream(torch.cuda.current_stream(device))

    def send_ready(self, wait: bool, limit: Optional[int] = None) -> None:
        """Send the blocks whose sources are all here (at most ``limit``); with ``wait``, wait for
        their copies from GPUs, else stop at the first block whose copies have not landed."""
        while self._ready and (limit is None or limit > 0):
            if limit is not None:
                limit -= 1
            block_id = self._ready[0]
            events = self._landed.pop(block_id, ())
            if not wait and not all(event.query() for event in events):
                self._landed[block_id] = list(events)
                return
            for event in events:
                event.synchronize()
            self._ready.popleft()
            self._send_block(*self._blocks[block_id])
        if self.all_sent:
            self._keep.clear()

    def _send_block(self, block: Block, parts: list[tuple[int, Segment, str]]) -> None:
        worker = self.worker
        req = next(worker._req_ids)
        segs = [i for i, _, _ in parts]
        self._unsent_to[block.server] -= 1
        header = {"op": self.op, "req": req, "block": block.block_id, "rank": worker.rank, "dtype": block.dtype,
                  "segs": None if len(segs) == len(block.segments) else segs}
        if self._unsent_to[block.server] and self.op != P.PULL:
            header["more"] = 1  # more pushes of this exchange follow: a GPU server may wait for them
        lane = self._lane_blocks.get(block.block_id)
        request = _Request(self.future, server=block.server, lane_block=None if lane is None else block.block_id)
        request.frames.append(P.pack_header({**header, "shm": 1} if lane is not None else header))
        staged: dict[int, Staging] = {}
        for _, seg, name in parts:
            if lane is not None:
                self._through_lane(lane, block, seg, name, request)
                continue
            if self.op != P.PULL:
                piece = self._sources[name][seg.offset:seg.offset + seg.numel]
                request.frames.append(byte_view(piece))
                request.keep.append(piece)
                if name in self._staged:
                    staged[id(self._staged[name])] = self._staged[name]
            if self._dests:
                request.dest.append(self._dests[name].piece(seg, request.keep))
        tracker = worker._submit(request, req, track=bool(staged))
        for staging in staged.values():
            staging.sent(tracker)  # reused only once ZeroMQ is done reading it

    def _through_lane(self, lane: Lane, block: Block, seg: Segment, name: str, request: _Request) -> None:
        """One segment of a lane request: its source into the push slot (a GPU source is there
        already), and the copy of its values out of the pull slot once the answer is in."""
        if self.op != P.PULL and name not in self._from_device:
            source = self._sources[name]
            host_copy(_lane_piece(lane.push_slot, block, seg, source.dtype), source[seg.offset:seg.offset + seg.numel])
        if self._dests:
            request.lane_copies.append(self._dests[name].from_lane(block, seg))

    def _destination(self, name: str, tensor: torch.Tensor, after_caller: bool) -> "_Destination":
        target = tensor.detach()
        if target.device.type == "cpu":
            if target.is_contiguous():
                return _Destination(target.reshape(-1))
            staging = torch.empty(target.numel(), dtype=target.dtype)
            self.future._finalizers.append(lambda: target.copy_(staging.view(target.shape)))
            return _Destination(staging)
        device = target.device
        stream = self.worker._copy_stream(device, "pull")
        if after_caller:
            self._after_caller(stream, device, "pull")  # work queued on it may read target
        self.future._copy_streams[device] = stream
        if target.is_contiguous() and all(block.block_id in self._lane_blocks
                                          for block, _, _ in self.worker._layout[name]):
            return _Destination(None, target.view(-1), None, stream)  # straight from the lanes' pull slots
        staging = self.worker._staging(self.worker._pull_staging, name, target)
        staging.wait()  # the copy out of it for the last pull has finished
        host = staging.typed(target.dtype)
        if target.is_contiguous():
            return _Destination(host, target.view(-1), staging, stream)

        def copy_whole() -> None:
            with torch.cuda.stream(stream):
                target.copy_(host.view(target.shape), non_blocking=True)
            staging.copied(stream)

        self.future._finalizers.append(copy_whole)
        return _Destination(host)


class _Destination:
    """Where one key's pulled values land: a host tensor, and for a GPU tensor its flat device view."""

    def __init__(self, host: Optional[torch.Tensor], device: Optional[torch.Tensor] = None,
                 staging: Optional[Staging] = None, stream: Optional["torch.cuda.Stream"] = None):
        self.host, self.device, self.staging, self.stream = host, device, staging, stream

    def piece(self, seg: Segment, keep: list) -> tuple[memoryview, Optional[Callable[[], None]]]:
        end = seg.offset + seg.numel
        host = self.host[seg.offset:end]
        keep.append(host)
        if self.device is None:
            return byte_view(host), None
        device, staging, stream = self.device[seg.offset:end], self.staging, self.stream

        def copy_to_device() -> None:
            with torch.cuda.stream(stream):
                device.copy_(host, non_blocking=True)
            staging.copied(stream)  # the next pull into this buffer waits for the copy

        return byte_view(host), copy_to_device

    def from_lane(self, block: Block, seg: Segment) -> "_LaneCopy":
        """The copy of one segment out of a lane's pull slot."""
        end = seg.offset + seg.numel
        if self.device is None:
            return _LaneCopy(self.host[seg.offset:end], block, seg, None)
        return _LaneCopy(self.device[seg.offset:end], block, seg, self.stream)


@dataclass
class _LaneCopy:
    """Where one segment of a lane reply goes: a host tensor, or a device tensor (copied on
    ``stream``)."""
    target: torch.Tensor
    block: Block
    seg: Segment
    stream: Optional["torch.cuda.Stream"]


def _lane_piece(slot, block: Block, seg: Segment, dtype: torch.dtype) -> torch.Tensor:
    """Where one segment lies in a lane's push or pull slot of its block, as a typed tensor."""
    size = dtype.itemsize
    return slot(block.block_id, seg.block_offset * size, seg.numel * size).view(dtype)


def init(scheduler: Optional[str] = None, *, rank: Optional[int] = None, timeout: Optional[float] = None,
         secret_file: Optional[str] = None, transport: Optional[Transport] = None) -> Worker:
    """Join the job as a worker. Under ps-launch every setting comes from ``PS_*`` variables;
    keyword arguments override them (``secret_file``: the job secret of an authenticated job).

    >>> worker = ps.init(scheduler="tcp://127.0.0.1:9091")   # doctest: +SKIP
    """
    config = node_config_from_env(scheduler=scheduler, rank=rank, start_timeout=timeout, secret_file=secret_file)
    return Worker(config, transport=transport)
