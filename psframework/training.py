"""``DistributedOptimizer``: a torch-style optimizer whose step runs on the parameter servers.

>>> opt = ps.DistributedOptimizer(model, ps.optim.Adam(lr=1e-3))   # doctest: +SKIP
>>> opt.zero_grad(); loss.backward(); opt.step()                   # doctest: +SKIP

With ``overlap=True`` (the default, except where every block goes through a device lane: see
``overlap_by_default``) communication overlaps the backward pass: a hook on every
parameter hands its gradient to a communication thread as soon as autograd has accumulated it, and
each shard block goes to its server (as one push_pull) once all the gradients in it are there, so
the blocks of the shard map, at most ``PS_CHUNK_BYTES`` (4 MiB) each, are the buckets. Since the
last layers finish their backward first, their blocks are on the wire, applied and on their way
back while the first layers still compute. ``step()`` hands over what no hook saw (unused
parameters are pushed as "no gradient", as without overlap), waits for every block's new values and returns: after
``step()`` the parameters hold exactly what the plain path gives, so the next forward needs no wait
of its own. A gradient goes as autograd left it: to clip or unscale gradients between
``backward()`` and ``step()`` (``clip_grad_norm_``, ``GradScaler.unscale_``), use ``overlap=False``.

Where the servers map the parameters (``_MappedParams``), a block of several host tensors goes
whole, once the hook of its last tensor has run (``_Packing``), with no work per tensor.

Threads: while a step is in flight the communication thread alone uses the worker's sockets (the
hooks, which run on autograd's threads, only enqueue, after copying a gradient where its server
reads it if the servers map the parameters: ``_MappedParams``), and it is idle between ``step()`` and the
next backward, when the worker may be used directly. With overlap every ``backward()`` commits its
gradients, so it needs one ``step()`` after each ``backward()``; for gradient accumulation over
several backward passes use ``overlap=False``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable, Iterable, Mapping, Optional

import torch

from . import protocol as P
from .compress import Codec
from .datapath.compression import CompressionArg
from .errors import ClosedError, ConfigError, PeerLostError, PSError, RolledBackError
from .lookups import TableLookups
from .nn import tables_of
from .optim import OptimizerSpec
from .worker import Worker, init
from .worker.exchange import Exchange, add_packed_block, unpack_block
from .worker.flat import FlatViews, flat_layout
from .worker.lanes import MAP_TIMEOUT
from .worker.plans import PackedBlock
from .worker.requests import Future
from .worker.worker import push_pull_packed

log = logging.getLogger("psframework.training")

_TICK = 0.001  # longest the communication thread leaves arrived replies and landed copies waiting


class DistributedOptimizer:
    """Registers the model's trainable parameters (calling ``ps.init()`` if no worker is given);
    ``step()`` pushes the gradients and pulls the updated values into the parameters.

    The model's ``ps.nn.Embedding``/``EmbeddingBag`` modules are its embedding tables: their rows
    live on the servers, updated by ``sparse_optimizer`` (or a module's own ``optimizer=``); their
    row gradients go with the dense ones in ``step()``. ``prefetch({module: next_ids})`` pulls the
    next batch's rows while this step runs (call it before ``backward()``).

    Checkpoints (defaults from ps-launch's ``--checkpoint-dir``, ``--checkpoint-every`` and
    ``--resume``): every ``checkpoint_every`` steps ``step()`` saves one; with ``resume`` the
    newest complete one is restored at start, and ``start_step`` says where to continue.

    ``overlap``: send each block from gradient hooks during backward (see the module's doc);
    default on, except for a GPU model whose every block goes through a device lane, where it
    costs more than it gives (``overlap_by_default``). Without overlap, a GPU model whose every
    block goes through a device lane (a GPU server of this host) and no tables nor
    ``checkpoint_every``: ``step()`` returns once the requests are
    sent, the copies of the new values queued on the GPU behind the servers' writes; the next
    ``step()``, ``step_count`` or ``close()`` takes the answers in, so an error of a step shows
    one step later (``Worker.push_pull(device_ordered=True)``).

    ``compression``: a ``ps.compress`` codec for the pushed gradients, or a dict of name patterns
    to codecs; ``pull_compression``: ``ps.compress.FP16()``, ``BF16()`` or ``Int8()`` for rounded pulls
    (``Worker.register``). Error-feedback residuals are not in checkpoints: a resumed worker
    starts with none.
    """

    def __init__(self, model: torch.nn.Module, optimizer: OptimizerSpec, worker: Optional[Worker] = None, *,
                 sparse_optimizer: Optional[OptimizerSpec] = None, overlap: Optional[bool] = None,
                 checkpoint_dir: Optional[str] = None, checkpoint_every: Optional[int] = None,
                 resume: Optional[bool] = None, compression: CompressionArg = None,
                 pull_compression: Optional[Codec] = None):
        self.worker = worker if worker is not None else init()
        self._owns_worker = worker is None
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        tables = tables_of(model)
        self._tables: Optional[TableLookups] = None
        self._overlap: Optional[_Overlap] = None
        self._shared: Optional[_MappedParams] = None
        self._given_up: list[_MappedParams] = []  # see _after_failed_step
        self._moved_mid_step: set[str] = set()  # see _after_failed_step
        self._rolled_back: Optional[int] = None  # the step the job went back to, not yet acted on
        # a step whose values are ordered on the GPU (``push_pull(device_ordered=True)``), not waited for yet
        self._unfinished: Optional[Future] = None
        config = self.worker.config
        self.checkpoint_dir = checkpoint_dir or config.checkpoint_dir
        self.checkpoint_every = config.checkpoint_every if checkpoint_every is None else checkpoint_every
        self.start_step = 0
        try:
            self.worker.register(self.params, optimizer=optimizer, tables=tables, sparse_optimizer=sparse_optimizer,
                                 compression=compression, pull_compression=pull_compression)
            self.worker.on_rollback(self._note_rollback)
            if tables:
                self._tables = TableLookups(self.worker, tables, self._refresh_if_rolled_back)
                for name, module in tables.items():
                    module.bind(self._tables, name)
            if (config.resume if resume is None else resume) and self.checkpoint_dir:
                self.start_step = self.worker.load_checkpoint(self.checkpoint_dir) or 0
            self.worker.lanes.direct.write_values = False  # see _MappedParams
            self._shared = _MappedParams.make(self.worker, self.params)
            if overlap is None:
                overlap = overlap_by_default(self.worker, self.params, bool(tables), self.checkpoint_every)
            if overlap:
                self._overlap = _Overlap(self.worker, self.params, self._grads,
                                         _Packing(lambda: self._shared, self._staged_grads))
        except BaseException:
            self.close()
            raise

    @property
    def step_count(self) -> int:
        """Steps taken, counting those before a resume: the worker's own count."""
        try:
            self._finish_unfinished()
        except RolledBackError as exc:  # the step was lost: the next step() drops its own too
            self._rolled_back = exc.step
        return self.worker.steps

    def _finish_unfinished(self) -> None:
        """Wait for the last step if it was left to complete on the GPU; raises its error, after
        moving the parameters away from where late answers to it may write (``_after_failed_step``)."""
        future, self._unfinished = self._unfinished, None
        if future is None:
            return
        try:
            future.wait()
        except BaseException:
            self._after_failed_step()
            raise
        if self._shared is not None:
            self._shared.completed()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch's; host gradients in memory the servers map (``_MappedParams``) are zeroed in
        place instead and count as none until backward reaches them."""
        in_place = self._shared.zero_grad(set_to_none) if self._shared is not None else ()
        for name, p in self.params.items():
            if name in in_place:
                continue
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def _grads(self, names: Optional[Iterable[str]] = None) -> dict[str, Optional[torch.Tensor]]:
        """The gradient to push of each parameter (of ``names``; None: no gradient this step. The
        servers do not step a parameter no worker has a gradient for, as torch.optim skips a None
        grad, and where some workers have one the others count as zero in the mean, DDP's rule);
        those of parameters in memory the servers map are copied where the servers read them
        (``_MappedParams.stage``)."""
        return self._staged_grads(names)[0]

    def _staged_grads(self, names: Optional[Iterable[str]] = None) -> tuple[dict, dict]:
        """``_grads``, and what ``_MappedParams.stage`` answered (the gradients staged where the
        servers read them; a host gradient in place is its view even where its parameter moved off
        its view, and is then pushed tensor by tensor)."""
        grads = {name: self.params[name].grad for name in (self.params if names is None else names)}
        staged = self._shared.stage(grads) if self._shared is not None else {}
        grads.update(staged)
        return grads, staged

    def prefetch(self, inputs) -> None:
        """Start pulling the next batch's rows now (``inputs``: a module, or its table's name, to the
        ids its forward will get); they are answered once this step is applied. Call it before
        ``backward()``."""
        if self._tables is None:
            raise ConfigError("prefetch(): this model has no ps.nn embedding tables")
        self._tables.prefetch(inputs)

    @torch.no_grad()
    def step(self) -> None:
        try:
            self._finish_unfinished()
        except RolledBackError as exc:  # this step's forward ran on the model before the rollback
            self._drop_step(exc.step)
            return
        if self._rolled_back is not None and self._overlap is None:
            # heard of after this step's forward: its gradients belong to the old model (with overlap
            # the communication thread finds out by the step's rollback epoch, and must end the step)
            self._drop_step(self._rolled_back)
            return
        try:
            self._exchange()
        except RolledBackError as exc:
            self._after_failed_step()
            self._drop_step(exc.step)
            return
        except BaseException:
            self._after_failed_step()
            raise
        self._pull_moved()
        try:
            if self.checkpoint_dir and self.checkpoint_every and self.step_count % self.checkpoint_every == 0:
                self.worker.save_checkpoint(self.checkpoint_dir, step=self.step_count)
        except RolledBackError as exc:  # a checkpoint abandoned because the job went back meanwhile
            self._drop_step(exc.step)

    def _exchange(self) -> None:
        push_rows = self._tables.push if self._tables is not None else None
        if self._overlap is None:
            self._step_without_overlap(push_rows)
        else:
            self._overlap.finish(push_rows)
        if self._shared is not None and self._unfinished is None:
            self._shared.completed()

    def _pull_moved(self) -> None:
        """After a step called again whose first call failed and moved the parameters: the exchange
        it went on with, begun before the move, wrote some of their values where they were. The
        step is applied already, so a failure here is not a failed step: the values are read again
        after the next one."""
        names, self._moved_mid_step = self._moved_mid_step, set()
        if not names:
            return
        try:
            self.worker.pull({name: self.params[name] for name in names}).wait()
        except RolledBackError as exc:
            self._drop_step(exc.step)
        except BaseException:
            self._moved_mid_step = names
            log.error("worker %d: step %d was applied, but the new values of the parameters its first call moved "
                      "could not be read back; they are read again after the next step", self.worker.rank,
                      self.worker.steps)
            raise

    def _after_failed_step(self) -> None:
        """A server may still read the gradients of a step that failed where they lie, and write
        its values there: both move to new buffers, and the old ones are left to it
        (``_MappedParams.renew``)."""
        if self._shared is None:
            return
        if self._overlap is not None and self._overlap.exchange_goes_on:
            self._moved_mid_step |= set(self._shared.views.params)
        try:
            moved = self._shared.renew()
        except Exception as exc:  # noqa: BLE001 -- the step's own error is the one to raise
            log.error("worker %d: could not move the parameters after a failed step: %s", self.worker.rank, exc)
            moved = False
        if not moved:
            self._shared.close()
            self._given_up.append(self._shared)  # its GPU buffers, which late answers may write, stay allocated
            self._shared = None

    def _note_rollback(self, step: int) -> None:
        self._rolled_back = step

    def _drop_step(self, step: int) -> None:
        """A server was restarted and the whole job went back to a checkpoint: this step is lost;
        take the restored values and go on (step_count is now the checkpoint's step)."""
        log.warning("worker %d: the job went back to step %d; this step is dropped", self.worker.rank, step)
        self._refresh()

    def _refresh_if_rolled_back(self) -> None:
        """Before a forward's first lookup: if the job went back, take the restored dense values,
        so that this step runs on the restored model."""
        if self._rolled_back is not None:
            log.warning("worker %d: the job went back to step %d; going on from there", self.worker.rank,
                        self._rolled_back)
            self._refresh()

    def _refresh(self) -> None:
        self._rolled_back = None
        if self._overlap is not None:  # the next step's forward runs on the values pulled here
            self._overlap.epoch = self.worker.client.rollback
        if self._tables is not None:
            self._tables.forget()
        try:
            self._finish_unfinished()
        except RolledBackError:
            pass  # the values pulled now are the restored ones
        if self.params:
            self.worker.pull(self.params).wait()
            self._moved_mid_step = set()

    def _step_without_overlap(self, push_rows) -> None:
        futures = [self._push_pull(device_ordered=push_rows is None)] if self.params else []
        if push_rows is not None:
            futures.append(push_rows() if futures else self.worker.counted(push_rows()))
        if len(futures) == 1 and futures[0].ordered_on_device and not self.checkpoint_every:
            self._unfinished = futures[0]  # the next kernels read the new values; errors come at the next step
            return
        for future in futures:
            future.wait()

    def _push_pull(self, device_ordered: bool):
        """The step's push_pull of every parameter; the blocks whose gradients were all staged where
        the servers read them go as one region each way (``FlatViews.packed``), with no work per
        tensor: for a model of ~100 tensors that work was most of a step's host time."""
        grads, staged = self._staged_grads()
        packed = self._shared.packed(staged) if self._shared is not None else {}
        if not packed:
            return self.worker.push_pull(grads, into=self.params, device_ordered=device_ordered)
        return push_pull_packed(self.worker, grads, self.params, packed, device_ordered=device_ordered)

    @property
    def early_blocks(self) -> int:
        """Blocks of the last step that went out during backward, before ``step()`` (0 without overlap)."""
        return self._overlap.early_blocks if self._overlap is not None else 0

    def close(self) -> None:
        try:
            self._finish_unfinished()
        except RolledBackError as exc:
            log.warning("worker %d: the job went back to step %d; the last step is dropped", self.worker.rank,
                        exc.step)
        finally:
            self._close()

    def _close(self) -> None:
        if self._overlap is not None:
            self._overlap.close()
            self._overlap = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
        if self._owns_worker:
            self.worker.close()

    def __enter__(self) -> "DistributedOptimizer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def overlap_by_default(worker: Worker, params: Mapping[str, torch.Tensor], tables: bool = False,
                       checkpoint_every: int = 0) -> bool:
    """``DistributedOptimizer``'s ``overlap`` when none is given: on, except where a step without it
    is left to complete on the GPU (``_step_without_overlap``): every parameter on one GPU, every
    block of them through a device lane whose server writes flags, none kept off the lanes by
    compression, no tables and no ``checkpoint_every``. There overlap's communication thread only
    takes host time from the training loop, whose launches bound the step: on one GPU the GPT
    trained at 0.53-0.88 of one process's speed with overlap and 0.72-1.17 without, ResNet-50 at
    0.83 and 0.95 (benchmarks/RESULTS_GPU.md)."""
    devices = {p.device for p in params.values()}
    servers = {block.server for name in params for block, _ in worker.shard_map.segments_of(name)}
    ordered_on_gpu = (not tables and not checkpoint_every and len(devices) == 1 and devices.pop().type == "cuda"
                      and worker.lanes.flag_watch is not None and bool(servers)
                      and servers <= set(worker.lanes.device_lanes)
                      and not worker.compression.keeps_off_lane(P.PushPull, list(params)))
    if ordered_on_gpu:
        log.info("worker %d: DistributedOptimizer without overlap by default: every block goes through a "
                 "device lane and each step is ordered on the GPU (overlap=True to have it)", worker.rank)
    return not ordered_on_gpu


def _by_server(worker: Worker, views: FlatViews) -> dict[int, list[torch.Tensor]]:
    """The parameters of ``views`` and their gradient views by the servers that hold blocks of them."""
    tensors: dict[int, list[torch.Tensor]] = {}
    for name in views.names:
        for server in {block.server for block, _ in worker.shard_map.segments_of(name)}:
            tensors.setdefault(server, []).extend((views.params[name].detach(), views.grad_view(name)))
    return tensors


def _introduce(worker: Worker, views: FlatViews) -> list[Future]:
    """Introduce the buffers of ``views`` to the servers that hold their blocks, without waiting
    (``DirectExchange.offer``); the futures of their answers."""
    return [future for server, tensors in _by_server(worker, views).items()
            for future in worker.lanes.direct.offer(server, tensors)]


def _await_maps(worker: Worker, futures: list[Future]) -> None:
    """Wait for the servers to say they map the buffers (``DirectExchange.offer``), so that the
    blocks go direct from the first step; a server that does not answer in time leaves them to
    the lanes until it does."""
    deadline = time.monotonic() + MAP_TIMEOUT
    for future in futures:
        try:
            future.wait(timeout=max(0.0, deadline - time.monotonic()))
        except RolledBackError:
            continue  # a server restarted: it is asked again at the first step
        except (PeerLostError, ClosedError):
            raise
        except PSError as exc:
            log.warning("worker %d: a server did not say that it maps the parameters' memory (%s); their blocks "
                        "go through the lanes until it does", worker.rank, exc)


def _packed_through_lanes(worker: Worker, params: Mapping[str, torch.Tensor]) -> set[str]:
    """The GPU tensors of blocks of several tensors whose servers have lanes to this worker: laid
    out block by block, each such block goes through its lane in one copy each way. Others stay
    torch's (a large tensor's block is one region already)."""
    laned = {*worker.lanes.device_lanes, *worker.lanes.lanes}
    blocks = [block for block in worker.shard_map.blocks if block.server in laned]
    places = {name: (p.device, p.dtype) for name, p in params.items() if p.is_cuda}
    return {name for _, offsets in flat_layout(blocks, places).values() for name in offsets}


MAX_RENEWS_IN_A_ROW = 2  # moves of GPU buffers in a row, after which a failed step ends the mapped memory


class _MappedParams:
    """The parameters that servers of this host map where they lie (``worker/direct.py``), as views
    of flat buffers (``FlatViews``; host ones in memory files, GPU ones in allocations held for the
    whole job, so that none is freed while a server maps it), and gradient buffers of the same
    layout that the servers read: the servers read the gradients and write the new values in
    place, with no copy through the lanes. GPU gradients stay torch's and the step copies them
    there (``stage``: one fused copy). GPU parameters that no server maps are laid out so too
    where they have lanes: each block then goes through its lane in one copy each way, not one
    per tensor (``FlatViews.packed``). Host gradients are views of their buffer,
    accumulated in place (``FlatViews.in_place``): ``zero_grad`` zeroes them in place, so ``p.grad``
    stays a tensor, and a hook on each notes which got a gradient since, so that one backward did
    not reach still counts as none (torch's ``set_to_none``). A server's late answer to a failed
    step must never write the parameters, nor read gradients of a later step, so after one both
    move to new buffers (``renew``); the old are let go at once on the host and, on a GPU, once a
    later step completed."""

    def __init__(self, worker: Worker, views: FlatViews, reached: set[str], buffers: "_MappedBuffers"):
        self.worker, self.views, self._buffers = worker, views, buffers
        self._retired: list[torch.Tensor] = []  # GPU buffers of failed steps (``renew``)
        self._gpu_renews_in_a_row = 0  # moves of GPU buffers since a step last completed
        self._reached = reached  # in place: got a gradient since zero_grad (the caller's, before the first)
        self._hooks = [views.params[name].register_post_accumulate_grad_hook(self._reach(name))
                       for name in views.in_place]
        worker.lanes.direct.write_values = True  # every parameter a server could map is a view

    @classmethod
    def make(cls, worker: Worker, params: dict[str, torch.Tensor]) -> Optional["_MappedParams"]:
        """For the parameters in memory a server of this host maps (host memory, GPU memory), and
        the GPU ones of packed blocks with lanes where no server maps GPU memory; None if there are none."""
        direct = worker.lanes.direct
        through_lanes = _packed_through_lanes(worker, params) if not direct.accepted_by_any(on_device=True) else set()
        mapped = {name: p for name, p in params.items()
                  if p.device.type in ("cpu", "cuda") and direct.accepted_by_any(on_device=p.is_cuda)
                  or name in through_lanes}
        if not mapped:
            return None
        reached = {name for name, p in mapped.items() if p.grad is not None}
        buffers = _MappedBuffers(direct)
        try:
            views = FlatViews(mapped, worker.shard_map.blocks, buffers, whole=True, host_in_place=True)
        except (OSError, torch.OutOfMemoryError) as exc:
            log.info("worker %d: no memory to lay the parameters out for the servers to map (%s); they go "
                     "through the lanes", worker.rank, exc)
            return None
        _await_maps(worker, _introduce(worker, views))
        return cls(worker, views, reached, buffers)

    def _reach(self, name: str):
        def reached(_: torch.Tensor) -> None:
            self._reached.add(name)
        return reached

    def stage(self, grads: Mapping[str, Optional[torch.Tensor]]) -> dict[str, Optional[torch.Tensor]]:
        """The gradients of mapped parameters whose values are still the views, where the servers
        read them (``FlatViews.stage``); the others are left out, but a gradient in place that
        counts as none (``_given``) is None."""
        if not self.views.in_place:  # GPU tensors only: every gradient is torch's own
            return self.views.stage(grads)
        given = self._given(grads)  # only the names asked for: overlap's hooks ask one at a time
        none = {name: None for name in grads if name in self.views.in_place and name not in given}
        return {**self.views.stage({name: grad for name, grad in grads.items() if name not in none}), **none}

    def packed(self, staged: Mapping[str, Optional[torch.Tensor]]) -> dict[int, PackedBlock]:
        """The blocks whose gradients ``stage`` staged whole, as one region each way (``FlatViews.packed``)."""
        return self.views.packed(staged)

    def _given(self, names: Iterable[str]) -> set[str]:
        """Those of ``names`` whose gradients in place count as given, as torch's would not be None:
        backward reached them since ``zero_grad``, or the caller assigned one."""
        views = self.views
        return {name for name in names if name in views.in_place and views.params[name].grad is not None
                and (name in self._reached or not views.grad_is_view(name))}

    def zero_grad(self, set_to_none: bool) -> set[str]:
        """Zero the gradients in place (views put back); their parameters' names. Without
        ``set_to_none`` those that had a gradient keep it, zeroed, as torch's do."""
        given = set() if set_to_none else self._given(self.views.in_place)
        self.views.zero_grad()
        self._reached = given
        return self.views.in_place

    def renew(self) -> bool:
        """After a failed step: move the parameters and the gradient buffers to new buffers. The old host ones
        are let go at once (what a late answer writes there then lies only in the server's mapping),
        the old GPU ones after the next step that completes (``completed``), when every server has
        answered what came before it. False if that fails (no memory, mostly), or if GPU buffers moved
        ``MAX_RENEWS_IN_A_ROW`` times since a step last completed (each move holds more GPU
        memory): then the parameters become ordinary tensors where there is memory for them, and
        the old GPU buffers stay (this object keeps them)."""
        if self._gpu_renews_in_a_row >= MAX_RENEWS_IN_A_ROW:
            log.warning("worker %d: %d steps failed in a row; the parameters leave the GPU memory the servers map "
                        "and go through the lanes from now on", self.worker.rank, self._gpu_renews_in_a_row + 1)
        else:
            given = self._given(self.views.in_place)
            try:
                self._let_go(self.views.renew())  # gradients in place move with what they hold
                self._reached = given
                self._offer()
                return True
            except Exception as exc:  # noqa: BLE001 -- whatever failed, do not stay where late answers write
                log.warning("worker %d: could not move the parameters to new buffers (%s); they go through the "
                            "lanes from now on", self.worker.rank, exc)
        self.worker.lanes.direct.write_values = False
        self._let_go(self.views.buffers)
        given = self._given(self.views.in_place)
        for name, param in self.views.params.items():
            try:
                param.data = param.data.clone()
                if name in self.views.in_place:
                    param.grad = param.grad.clone() if name in given else None
            except torch.OutOfMemoryError:
                log.error("worker %d: no memory to move %r away from where a failed step's late answers may "
                          "write it", self.worker.rank, name)
        return False

    def _offer(self) -> None:
        """Introduce the new buffers to the servers now, without waiting (a failed step's servers
        may not answer): the first blocks of the next step that find them not mapped yet take the lanes."""
        try:
            _introduce(self.worker, self.views)
        except PSError as exc:
            log.info("worker %d: could not introduce the parameters' new memory to the servers yet (%s)",
                     self.worker.rank, exc)

    def _let_go(self, buffers: list[torch.Tensor]) -> None:
        gpu = [buffer for buffer in buffers if buffer.is_cuda]
        self._buffers.take_back([buffer for buffer in buffers if not buffer.is_cuda])
        self._retired += gpu
        self._gpu_renews_in_a_row += bool(gpu)

    def completed(self) -> None:
        """A step completed: the buffers of failed steps before it are read by no server any more."""
        self._gpu_renews_in_a_row = 0
        if self._retired:
            self._buffers.take_back(self._retired)
            self._retired = []

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class _MappedBuffers:
    """The buffers of ``_MappedParams``' ``FlatViews``: host ones in memory files, whose memory goes
    back once no server maps them; GPU ones torch's. Where servers may map GPU memory, a GPU one is
    never given back to torch's allocator while the job lasts: one that no server uses any more
    waits for the next ``renew`` (the driver documents freeing an exported allocation that another
    process maps as undefined behaviour, and torch's allocator frees its cached segments in
    ``empty_cache`` or when it runs out of memory). Laid out for the lanes only, they go back to it."""

    def __init__(self, direct):
        self._direct = direct
        self._spare: dict[tuple, list[torch.Tensor]] = {}  # (numel, dtype, device) -> GPU buffers

    def __call__(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        spare = self._spare.get((numel, dtype, device))
        if spare:
            return spare.pop()
        if device.type == "cpu":
            return self._direct.shared_empty(numel, dtype)
        return torch.empty(numel, dtype=dtype, device=device)

    def take_back(self, buffers: list[torch.Tensor]) -> None:
        self._direct.free([buffer for buffer in buffers if not buffer.is_cuda])
        for buffer in buffers:
            if buffer.is_cuda and self._direct.gpu_memory_mapped:
                self._spare.setdefault((buffer.numel(), buffer.dtype, buffer.device), []).append(buffer)


_READY, _BLOCK, _TENSORS, _FINISH, _STOP = "ready", "block", "tensors", "finish", "stop"


class _Packing:
    """Overlap's packed blocks (``FlatViews.packed``): each tensor's hook counts its
    block down, and the last one hands the whole block over as one region, with no work per tensor
    (tensor by tensor, backward and ``step()`` of a model of a hundred small tensors took three
    times torch's; ``benchmarks/RESULTS.md``). A GPU block is handed over with an event recorded
    after its staging. ``shared``: the optimizer's ``_MappedParams`` now (None once the parameters
    left the memory the servers map); ``staged_of``: ``_staged_grads``."""

    def __init__(self, shared: Callable[[], Optional["_MappedParams"]], staged_of: Callable):
        mapped = shared()
        regions = mapped.views.regions if mapped is not None else {}
        self._shared, self._staged_of = shared, staged_of
        self.names_of = {block_id: tuple(region.names) for block_id, region in regions.items()}
        self.block_of = {name: block_id for block_id, names in self.names_of.items() for name in names}
        self._waiting: dict[int, set[str]] = {}  # this step's blocks, each with the tensors it still waits for

    def regions(self) -> dict[int, PackedBlock]:
        """The blocks an exchange may send packed now."""
        mapped = self._shared()
        return {} if mapped is None else \
            {block_id: region for block_id, region in mapped.views.regions.items() if block_id in self.names_of}

    def reached(self, name: str) -> Optional[int]:
        """``name``'s gradient is in (under overlap's lock): its block's id if it was its block's last."""
        block_id = self.block_of[name]
        waiting = self._waiting.get(block_id)
        if waiting is None:
            waiting = self._waiting[block_id] = set(self.names_of[block_id])
        waiting.discard(name)
        if waiting:
            return None
        del self._waiting[block_id]
        return block_id

    def take(self, block_id: int) -> tuple[bool, dict[str, Optional[torch.Tensor]], Optional["torch.cuda.Event"]]:
        """Stage a block's gradients: whether every one went into the block's region, the gradients,
        and for GPU gradients an event recorded after them and their staging (on the current stream)."""
        grads, staged = self._staged_of(self.names_of[block_id])
        mapped = self._shared()
        whole = mapped is not None and mapped.views.packed_block(block_id, staged) is not None
        on_gpu = next((grad.device for grad in grads.values() if grad is not None and grad.is_cuda), None)
        staged_after = None
        if on_gpu is not None:
            staged_after = torch.cuda.Event()
            staged_after.record(torch.cuda.current_stream(on_gpu))
        return whole, grads, staged_after

    def unfinished(self) -> list[str]:
        """The tensors that came of the blocks some of whose tensors did not (under overlap's lock,
        at the step); those blocks go tensor by tensor. ``forget`` them once handed over."""
        return [name for block_id, left in self._waiting.items() for name in self.names_of[block_id]
                if name not in left]

    def forget(self) -> None:
        self._waiting = {}


class _Overlap:
    """The hooks and the communication thread of one DistributedOptimizer with overlap."""

    def __init__(self, worker: Worker, params: dict[str, torch.Tensor],
                 grads_of: Callable[[Iterable[str]], dict[str, Optional[torch.Tensor]]],
                 packing: Optional[_Packing] = None):
        self.worker = worker
        self.params = params
        self._grads_of = grads_of  # the gradients to push, by name (``DistributedOptimizer._grads``)
        self._packing = packing if packing is not None else _Packing(lambda: None, grads_of)
        self.early_blocks = 0
        # the last finish() failed handing over: the exchange under way goes on when step() is called again
        self.exchange_goes_on = False
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._done: queue.SimpleQueue = queue.SimpleQueue()  # (the finish() it answers, its result)
        self._finishes = 0  # finish() calls, numbered: one interrupted while waiting leaves its result behind
        self._lock = threading.Lock()
        self._handed: set[str] = set()  # keys whose gradients went to the thread in this step
        # the rollback epoch this step's forward ran in: a step begun before a rollback is dropped
        # whole, also when the thread hears of the rollback only after the hooks handed it gradients
        self.epoch = worker.client.rollback
        self._thread = threading.Thread(target=self._run, name=f"ps-overlap-worker-{worker.rank}", daemon=True)
        self._thread.start()
        self._hooks = []
        for name, p in params.items():
            self._hooks.append(p.register_hook(self._guard(name)))
            self._hooks.append(p.register_post_accumulate_grad_hook(self._hook(name)))

    # -- the training thread, and autograd's --------------------------------------------------

    def _guard(self, name: str):
        # runs before autograd accumulates into .grad, which may already be on the wire
        def guard(grad: torch.Tensor) -> None:
            with self._lock:
                if name in self._handed:
                    raise ConfigError(
                        f"a second gradient of {name!r} before step(): with overlap=True every backward() "
                        "sends its gradients, so call step() after each one; for gradient accumulation "
                        "create the DistributedOptimizer with overlap=False")
        return guard

    def _hook(self, name: str):
        if name in self._packing.block_of:
            return lambda _: self._block_reached(name)

        def hook(_: torch.Tensor) -> None:
            grad = self._grads_of([name])[name]  # before it counts as handed: this may raise
            with self._lock:
                self._handed.add(name)
            ready = None
            if grad.is_cuda:
                ready = torch.cuda.Event()
                ready.record()  # on this backward thread's current stream, after the gradient's kernels
            self._queue.put((_READY, name, grad, ready))
        return hook

    def _block_reached(self, name: str) -> None:
        """The hook of a tensor of a packed block: the block goes once its last tensor is in, whole
        if its every gradient went into its region, else tensor by tensor."""
        with self._lock:
            self._handed.add(name)
            block_id = self._packing.reached(name)
        if block_id is None:
            return
        try:
            whole, grads, staged_after = self._packing.take(block_id)
        except BaseException:  # not handed over: step() hands these over itself, or raises
            with self._lock:
                self._handed.difference_update(self._packing.names_of[block_id])
            raise
        self._queue.put((_BLOCK if whole else _TENSORS, block_id, staged_after, grads))

    def finish(self, push_rows=None) -> None:
        """Hand over the gradients no hook saw (and ``push_rows``, which the thread calls once they
        are sent), then wait for the step's new values."""
        if not self._thread.is_alive():
            raise ClosedError("the communication thread of this DistributedOptimizer has stopped")
        with self._lock:  # if staging raises, a step() called again hands the same over
            self.exchange_goes_on = True
            rest = self._grads_of([name for name in self.params if name not in self._handed] +
                                  self._packing.unfinished())
            self.exchange_goes_on = False
            self._handed = set()
            self._packing.forget()
        ready = {}
        for grad in rest.values():
            if grad is not None and grad.is_cuda and grad.device not in ready:
                ready[grad.device] = torch.cuda.Event()
                ready[grad.device].record(torch.cuda.current_stream(grad.device))
        self._finishes += 1
        self._queue.put((_FINISH, self._finishes, rest, ready, push_rows))
        result = self._result_of(self._finishes)
        if isinstance(result, BaseException):
            raise result
        result.order_streams()  # our current streams wait for the copies onto the parameters

    def _result_of(self, finish: int):
        """The thread's result for the ``finish``-th finish(); those of earlier ones that were
        interrupted while waiting (Ctrl-C) are dropped, their errors logged."""
        while True:
            try:
                answered, result = self._done.get(timeout=1.0)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise ClosedError("the communication thread of this DistributedOptimizer died") from None
                continue
            if answered == finish:
                return result
            if isinstance(result, BaseException):
                log.warning("worker %d: a step interrupted while waiting for its exchange failed after: %s",
                            self.worker.rank, result)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the communication thread. If it is waiting on a peer that lives but does not
        answer, that wait is interrupted; a thread that still does not stop is left behind (it
        is a daemon) with an error in the log, never waited for without end."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._queue.put((_STOP,))
        self._thread.join(timeout=1.0)
        if not self._thread.is_alive():
            return
        self.worker.membership.interrupt()
        try:
            self._thread.join(timeout=timeout)
        finally:
            self.worker.membership.resume()
        if self._thread.is_alive():
            log.error("worker %d: the communication thread of DistributedOptimizer did not stop within %.0f s; "
                      "leaving it behind", self.worker.rank, timeout + 1.0)

    # -- the communication thread ------------------------------------------------------------

    def _run(self) -> None:
        exchange: Optional[Exchange] = None
        error: Optional[BaseException] = None
        while True:
            try:
                items = [self._queue.get(timeout=_TICK if exchange is not None else None)]
            except queue.Empty:
                items = []
            while True:  # take everything queued, so a burst of hooks is one pass
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            for item in items:
                if item[0] == _STOP:
                    return
                if error is None:
                    try:
                        if exchange is None:
                            exchange = self.worker.exchange(P.PushPull, list(self.params), self.params,
                                                            after_caller=False, epoch=self.epoch,
                                                            packed=self._packing.regions())
                            self.worker.counted(exchange.future)
                        if item[0] == _FINISH:
                            self._finish(exchange, *item[2:])
                        else:
                            self._take(exchange, item)
                    except BaseException as exc:  # handed to step(), which raises it
                        error = exc
                        if exchange is not None:
                            exchange.abandon()  # late answers must not write the parameters
                if item[0] == _FINISH:
                    self._done.put((item[1], error if error is not None else exchange.future))
                    exchange, error = None, None
            if exchange is not None and error is None:
                try:
                    exchange.send_ready(wait=False)
                    self.worker.progress(0)
                except BaseException as exc:
                    error = exc
                    exchange.abandon()

    def _take(self, exchange: Exchange, item: tuple) -> None:
        """Add what a hook handed over: a tensor, a packed block whole, or a packed block's tensors."""
        if item[0] == _READY:
            _, name, grad, ready = item
            self._add(exchange, name, grad, ready)
        elif not (item[0] == _BLOCK and add_packed_block(exchange, item[1], after=item[2])):
            # a block not staged whole, or one this exchange sends tensor by tensor (no lane)
            for name, grad in item[3].items():
                self._add(exchange, name, grad, item[2])
        exchange.send_ready(wait=False)

    def _add(self, exchange: Exchange, name: str, grad: Optional[torch.Tensor], ready) -> None:
        """``exchange.add``; a tensor of a block the exchange was to send packed sends that block tensor by tensor."""
        if name in exchange.packed_names:
            unpack_block(exchange, self._packing.block_of[name], self.params)
        exchange.add(name, grad, after=ready)

    def _finish(self, exchange: Exchange, rest: dict[str, torch.Tensor], ready: dict, push_rows) -> None:
        self.early_blocks = exchange.sent_blocks
        for name, grad in rest.items():
            self._add(exchange, name, grad, ready.get(grad.device) if grad is not None else None)
        while not exchange.all_sent:
            # take in the replies that are here before waiting for the next block's copy, so their
            # copies onto the GPU overlap the rest of the backward pass instead of following it
            self.worker.progress(0)
            exchange.send_ready(wait=True, limit=1)
        rows = push_rows() if push_rows is not None else None
        exchange.future.wait()
        if rows is not None:
            rows.wait()


__all__ = ["DistributedOptimizer"]
