"""Server-side update rules.

A server keeps its shards as flat 1-D tensors ("blocks"). The user picks an update rule with a
small frozen spec; the spec travels to the servers as a msgpack-safe dict, and each server runs a
real ``torch.optim`` optimizer over its blocks, so the math is exactly torch's. Every rule here
is elementwise, which is why cutting parameters into arbitrary blocks does not change the result::

    import psframework as ps

    spec = ps.optim.SGD(lr=0.1, momentum=0.9)
    wire = spec.to_wire()                       # {"name": "sgd", "lr": 0.1, "momentum": 0.9, ...}
    assert ps.optim.optimizer_from_wire(wire) == spec

    blocks = [torch.zeros(1000), torch.zeros(24)]
    opt = ps.optim.ShardOptimizer(spec, blocks)
    opt.step({1: torch.ones(24)})               # only block 1 moves
    assert opt.steps_of(1) == 1 and opt.steps_of(0) == 0
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Union

import torch

from psframework.errors import BadRequestError, ConfigError

# A sync step's tiles (ShardOptimizer.tiles), by measurement (benchmarks/tiles.py, RESULTS.md issue
# 20): 1 MiB was the best or close to it for 2 and 4 workers; 64 KiB tiles lose to the per-call cost.
TILE_BYTES = 1 << 20

__all__ = ["SGD", "Adagrad", "Adam", "OptimizerSpec", "RowWiseAdagrad", "ShardOptimizer", "SparseAdam",
           "optimizer_from_wire"]


def _number(
    spec: OptimizerSpec, field: str, *, low: float = 0.0, below: float | None = None
) -> None:
    value = getattr(spec, field)
    allowed = f">= {low}" if below is None else f"in [{low}, {below})"
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (below is not None and value >= below):
        raise ConfigError(
            f"{type(spec).__name__}: {field} must be a finite number {allowed}, got {value!r}"
        )
    object.__setattr__(spec, field, float(value))


@dataclass(frozen=True)
class OptimizerSpec:
    """A server-side update rule: what travels on the wire, and how to build it over blocks."""

    name: ClassVar[str]
    torch_class: ClassVar[type[torch.optim.Optimizer]]
    # torch.optim.SGD keeps no per-parameter step count, so ShardOptimizer keeps one for it.
    torch_counts_steps: ClassVar[bool] = True
    # a rule for the rows of embedding tables only (server/row_rules.py), not for dense tensors
    tables_only: ClassVar[bool] = False

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-safe dict: ``{"name": ..., field: value, ...}``, tuples as lists."""
        wire: dict[str, Any] = {"name": self.name}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            wire[f.name] = list(value) if isinstance(value, tuple) else value
        return wire

    def hyperparameters(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def build(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        """A torch optimizer over ``params`` (leaf tensors on one device): fused where torch has a
        fused kernel for the device and every dtype present, else foreach. On a CPU too: the fused
        kernels take the mean over the workers as they read the gradient (``grad_scale``), and
        one pass over a block instead of several (SGD with momentum: 22 ms instead of 42 for
        64 MiB on one core, benchmarks/RESULTS.md)."""
        hp = self.hyperparameters()
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ConfigError(
                f"the blocks of one optimizer must share a device, got {sorted(map(str, devices))}"
            )
        device = next(iter(devices), torch.device("cpu"))
        if all(_fused_works(self, device, dtype) for dtype in {p.dtype for p in params}):
            return self.torch_class(params, **hp, fused=True)
        return self.torch_class(params, **hp, foreach=True)


@functools.lru_cache(maxsize=None)
def _fused_works(spec: OptimizerSpec, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch's fused kernel takes this dtype on this device and computes the rule's numbers
    (those of float64) up to the dtype's rounding: torch 2.11-2.13's fused CPU SGD in bf16 and fp16
    leaves every full vector of elements as it was (pytorch/pytorch#191763). Probed with two
    throwaway steps of lr 1 (a step far larger than the rounding), as torch checks lazily."""
    if hasattr(spec, "lr"):
        spec = dataclasses.replace(spec, lr=1.0)  # steps far larger than the dtype's rounding
    if not dtype.is_floating_point:
        return False
    try:
        fused = _probe_steps(spec, device, dtype, fused=True)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):
        return False
    exact = _probe_steps(spec, device, torch.float64, foreach=True)  # the rule's own numbers
    # CUDA's fused Adam in float32 is 14 ulps off (its roundings, not a defect; benchmarks/RESULTS_GPU.md);
    # a broken kernel that skips elements is off by a whole step, at least 64 ulps even in bf16
    tolerance = 32 * torch.finfo(dtype).eps * (exact.abs() + 1)
    return bool(((fused - exact).abs() <= tolerance).all())


def _probe_steps(spec: OptimizerSpec, device: torch.device, dtype: torch.dtype, **impl) -> torch.Tensor:
    probe = torch.linspace(-1, 1, 515, device=device).to(dtype)  # beyond any vector width, with a tail
    optimizer = spec.torch_class([probe], **spec.hyperparameters(), **impl)
    # gradients away from zero: Adam's squares then stay far above fp16's smallest numbers
    signs = 1 - 2 * (torch.arange(515, device=device) % 2)
    for step in range(2):
        probe.grad = (torch.linspace(0.5, 2, 515, device=device) * signs * (step + 1)).to(dtype)
        optimizer.step()
    return probe.detach().double()


@dataclass(frozen=True)
class SGD(OptimizerSpec):
    """Stochastic gradient descent, as ``torch.optim.SGD``."""

    name: ClassVar[str] = "sgd"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD
    torch_counts_steps: ClassVar[bool] = False

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    def __post_init__(self) -> None:
        for field in ("lr", "momentum", "dampening", "weight_decay"):
            _number(self, field)
        if not isinstance(self.nesterov, bool):
            raise ConfigError(f"SGD: nesterov must be a bool, got {self.nesterov!r}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ConfigError(
                "SGD: nesterov=True requires momentum > 0 and dampening == 0, "
                f"got momentum={self.momentum!r}, dampening={self.dampening!r}"
            )


@dataclass(frozen=True)
class Adam(OptimizerSpec):
    """Adam with L2 weight decay, as ``torch.optim.Adam``."""

    name: ClassVar[str] = "adam"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        for field in ("lr", "eps", "weight_decay"):
            _number(self, field)
        _check_betas(self)


def _check_betas(spec: OptimizerSpec) -> None:
    betas, name = spec.betas, type(spec).__name__
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ConfigError(f"{name}: betas must be a pair of numbers in [0, 1), got {betas!r}")
    for i, beta in enumerate(betas):
        ok = isinstance(beta, (int, float)) and not isinstance(beta, bool)
        if not ok or not 0.0 <= beta < 1.0:
            raise ConfigError(f"{name}: betas[{i}] must be a number in [0, 1), got {beta!r}")
    object.__setattr__(spec, "betas", (float(betas[0]), float(betas[1])))


@dataclass(frozen=True)
class Adagrad(OptimizerSpec):
    """Adagrad, as ``torch.optim.Adagrad`` with no lr decay or weight decay."""

    name: ClassVar[str] = "adagrad"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adagrad

    lr: float = 1e-2
    eps: float = 1e-10

    def __post_init__(self) -> None:
        for field in ("lr", "eps"):
            _number(self, field)


@dataclass(frozen=True)
class RowWiseAdagrad(OptimizerSpec):
    """For embedding tables: Adagrad with one accumulator per row, ``s += mean(g^2)``,
    ``w -= lr * g / (sqrt(s) + eps)`` (a dim-th of Adagrad's state)."""

    name: ClassVar[str] = "rowwise_adagrad"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adagrad
    tables_only: ClassVar[bool] = True

    lr: float = 1e-2
    eps: float = 1e-10

    def __post_init__(self) -> None:
        for field in ("lr", "eps"):
            _number(self, field)


@dataclass(frozen=True)
class SparseAdam(OptimizerSpec):
    """For embedding tables: Adam that moves only the touched rows' moments, as
    ``torch.optim.SparseAdam`` (bias correction by the table's step count)."""

    name: ClassVar[str] = "sparse_adam"
    torch_class: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SparseAdam
    tables_only: ClassVar[bool] = True

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    def __post_init__(self) -> None:
        for field in ("lr", "eps"):
            _number(self, field)
        _check_betas(self)


_SPECS: dict[str, type[OptimizerSpec]] = {cls.name: cls for cls in (SGD, Adam, Adagrad, RowWiseAdagrad, SparseAdam)}


def _adam_fits_fused_call(group: dict) -> bool:
    """Whether torch's fused Adam kernel, called directly, applies this group's rule."""
    return not (group["amsgrad"] or group.get("decoupled_weight_decay") or group["capturable"])


def _call_fused_adam(params: list, grads: list, exp_avgs: list, exp_avg_sqs: list, steps: list, group: dict,
                     divisor: Optional[torch.Tensor]) -> None:
    """torch's fused Adam kernel as torch's step() calls it (the step counts already advanced)."""
    beta1, beta2 = group["betas"]
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"], beta1=beta1,
                       beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                       grad_scale=divisor, found_inf=None)


class _UnevenSteps(Exception):
    """Adam's step counts of a run's params differ (some stepped alone): it cannot step as one."""


@dataclass
class _Run:
    """Consecutive params that are views of one flat tensor, with their state kept as views of one
    flat tensor of each kind (``ShardOptimizer.step_run``)."""
    params: list[torch.Tensor]
    flat: torch.Tensor
    state: dict[str, torch.Tensor]  # by kind, the flat tensor the params' state are views of
    firsts: dict[str, torch.Tensor]  # by kind, the first param's state tensor (replaced: the run is stale)
    steps: list[torch.Tensor]  # Adam's step count of each param, all equal

    @classmethod
    def make(cls, state: Mapping, params: list[torch.Tensor], flat: torch.Tensor,
             keys: tuple[str, ...]) -> Optional["_Run"]:
        """The run of ``params`` in ``flat``, its state moved into flat tensors; None if they are not
        its views in order or a param has no state yet; ``_UnevenSteps`` if Adam's step counts
        differ (asking waits for the device)."""
        states = [state.get(p, {}) for p in params]
        if not _consecutive(params, flat) or not all(set(keys) <= s.keys() for s in states):
            return None
        steps = [s["step"] for s in states] if "exp_avg" in keys else []
        if steps and not all(isinstance(t, torch.Tensor) for t in steps):
            return None
        if steps and not bool(torch.stack(steps).eq(steps[0]).all()):
            raise _UnevenSteps
        flats = {}
        for key in keys:
            tensors = [s[key] for s in states]
            flats[key] = _flat_of(tensors, params, flat)
            for s, view in zip(states, _views_like(flats[key], params, flat)):
                s[key] = view
        return cls(params, flat, flats, {key: states[0][key] for key in keys}, steps)

    def fits(self, state: Mapping, flat: torch.Tensor) -> bool:
        first = state.get(self.params[0], {})
        return flat is self.flat and all(first.get(key) is view for key, view in self.firsts.items())

    def flats(self, key: str) -> list[torch.Tensor]:
        return [self.state[key]] if key in self.state else []


def _consecutive(tensors: list[torch.Tensor], flat: torch.Tensor) -> bool:
    """Whether ``tensors`` are 1-D views of ``flat`` that tile it in order."""
    offset = flat.storage_offset()
    for t in tensors:
        if t.dim() != 1 or t.untyped_storage().data_ptr() != flat.untyped_storage().data_ptr() \
                or t.storage_offset() != offset or (t.numel() > 1 and t.stride(0) != 1):
            return False
        offset += t.numel()
    return offset == flat.storage_offset() + flat.numel() and flat.is_contiguous()


def _views_like(whole: torch.Tensor, params: list[torch.Tensor], flat: torch.Tensor) -> list[torch.Tensor]:
    base = flat.storage_offset()
    return [whole[p.storage_offset() - base:p.storage_offset() - base + p.numel()] for p in params]


def _flat_of(tensors: list[torch.Tensor], params: list[torch.Tensor], flat: torch.Tensor) -> torch.Tensor:
    """One flat tensor laid out like ``flat`` with ``tensors`` where ``params`` are in it: the one they
    are views of already (a run made again), or a fresh one they are copied into."""
    first = tensors[0]
    storage = first.untyped_storage()
    if storage.nbytes() >= (first.storage_offset() + flat.numel()) * first.element_size():
        whole = torch.empty(0, dtype=first.dtype, device=first.device).set_(storage, first.storage_offset(), flat.shape)
        if _consecutive(tensors, whole):
            return whole
    fresh = torch.empty_like(flat)
    torch._foreach_copy_(_views_like(fresh, params, flat), tensors)
    return fresh


def optimizer_from_wire(d: Mapping[str, Any]) -> OptimizerSpec:
    """The spec that ``to_wire`` produced ``d`` from; ``ConfigError`` if ``d`` names no known rule
    or has unknown, missing or bad fields."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"an optimizer must be a dict with a 'name', got {type(d).__name__}")
    name = d.get("name")
    cls = _SPECS.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ConfigError(f"unknown optimizer name {name!r}; known: {sorted(_SPECS)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields) - {"name"}, key=str)
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise ConfigError(f"{cls.__name__}: missing required field(s) {missing}")
    return cls(**{k: v for k, v in d.items() if k != "name"})


class ShardOptimizer:
    """Applies one update rule to a server's blocks; only the blocks given grads are stepped."""

    def __init__(self, spec: OptimizerSpec, params: Sequence[torch.Tensor]) -> None:
        self.spec = spec
        self.params = list(params)
        for i, p in enumerate(self.params):
            if p.dim() != 1:
                raise ConfigError(
                    f"block {i} must be a flat 1-D tensor, got shape {tuple(p.shape)}"
                )
        self.opt = spec.build(self.params) if self.params else None
        self._divisors: dict[tuple[float, torch.device], torch.Tensor] = {}
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # where a tile's gradients are summed
        self._runs: dict[int, _Run] = {}  # by first param: runs whose state is flat (step_run)
        self._run_of: dict[int, tuple[int, int]] = {}  # param -> (first param, params) of its run
        self._uneven: set[int] = set()  # runs whose Adam step counts differ, until one of them steps alone

    def step(self, grads: Mapping[int, Union[torch.Tensor, list[torch.Tensor]]], scale: float = 1.0) -> None:
        """Apply one update to exactly the blocks in ``grads`` (block index -> gradient), with the
        gradients multiplied by ``scale`` first. The gradients may be changed in place (scaled,
        and by torch's nesterov step). A list instead of a gradient is several workers'
        gradients not summed yet, for a block where ``tiles`` says so: they are summed a tile at
        a time, each tile just before it is stepped, so the sum never leaves the cache."""
        if not grads:
            return
        for index, grad in grads.items():
            self._check_grad(index, grad)
        self._forget_runs_stepped_apart(grads)
        tiled = {index: grad for index, grad in grads.items() if isinstance(grad, list)}
        if tiled:
            self._step_tiles(tiled, scale)
            self._count_steps([self.params[index] for index in tiled])
        grads = {index: grad for index, grad in grads.items() if not isinstance(grad, list)}
        if grads:
            self._step_whole(grads, scale)

    def step_run(self, first: int, count: int, flat: torch.Tensor, grad: torch.Tensor, scale: float = 1.0) -> bool:
        """Step params ``first`` .. ``first + count - 1``, consecutive views of ``flat`` (a server's
        block), from ``grad`` laid out like ``flat``: torch's fused kernel once over the run as one
        tensor, whose state is made views of one flat tensor of each kind (once). Stepping a
        ResNet-50 block of 150 tensors one by one took a GPU server 0.8 ms of per-tensor work a
        step. The same rule element by element: Adam to the bit, SGD to its last bit (torch's CUDA
        kernel fuses a multiply-add for the tensors it reads aligned, not for the others).
        False, with nothing done, where it cannot: another rule or options, a param without state
        yet (torch's first step makes it), Adam's step counts differ, and on a CPU, whose fused
        kernels round the elements of a vector's body and a tensor's tail apart (the server's CPU
        steps go tile by tile instead: ``tiles``)."""
        keys = self._run_keys()
        if keys is None or flat.device.type != "cuda" or \
                (grad.shape, grad.dtype, grad.device) != (flat.shape, flat.dtype, flat.device):
            return False
        run = self._runs.get(first)
        if run is None or not run.fits(self.opt.state, flat):
            run = self._make_run(first, count, flat, keys)
            if run is None:
                return False
        divisor = self._divisor(scale, flat.device) if scale != 1.0 else None
        if type(self.opt) is torch.optim.SGD:
            self._call_fused_sgd([flat], [grad], run.flats("momentum_buffer"), divisor)
            self._count_steps(run.params)
            return True
        torch._foreach_add_(run.steps, 1)
        _call_fused_adam([flat], [grad], run.flats("exp_avg"), run.flats("exp_avg_sq"), run.steps[:1],
                         self.opt.param_groups[0], divisor)
        return True

    def _make_run(self, first: int, count: int, flat: torch.Tensor, keys: tuple[str, ...]) -> Optional["_Run"]:
        if first in self._uneven:
            return None  # asked once (a wait for the device): not again until one of them steps alone
        self._run_of.update((index, (first, count)) for index in range(first, first + count))
        try:
            run = _Run.make(self.opt.state, self.params[first:first + count], flat, keys)
        except _UnevenSteps:
            self._uneven.add(first)
            return None
        if run is not None:
            self._runs[first] = run
        return run

    def _forget_runs_stepped_apart(self, grads: Mapping[int, Any]) -> None:
        """Runs some of whose params ``step`` steps without the others: Adam's step counts of those
        may differ now (and agree again, if it was the ones behind)."""
        for first, count in {self._run_of[index] for index in grads if index in self._run_of}:
            if not all(index in grads for index in range(first, first + count)):
                self._runs.pop(first, None)
                self._uneven.discard(first)

    def _run_keys(self) -> Optional[tuple[str, ...]]:
        """The state a run of params keeps flat under this rule, or None where ``step_run`` cannot step."""
        if self.opt is None or len(self.opt.param_groups) != 1 or not self.opt.param_groups[0].get("fused"):
            return None
        group = self.opt.param_groups[0]
        if type(self.opt) is torch.optim.SGD:
            return ("momentum_buffer",) if group["momentum"] else ()
        if type(self.opt) is torch.optim.Adam and _adam_fits_fused_call(group):
            return ("exp_avg", "exp_avg_sq")
        return None

    def _check_grad(self, index: int, grad: Union[torch.Tensor, list[torch.Tensor]]) -> None:
        if not 0 <= index < len(self.params):
            raise BadRequestError(f"no block {index}: this server holds {len(self.params)}")
        p = self.params[index]
        if isinstance(grad, list) and (len(grad) < 2 or not self.tiles(index)):
            raise BadRequestError(f"block {index}: {type(self.spec).__name__} here needs its gradients summed first")
        for one in grad if isinstance(grad, list) else [grad]:
            if one.shape != p.shape:
                raise BadRequestError(f"grad for block {index} has shape {tuple(one.shape)}, expected {tuple(p.shape)}")

    def tiles(self, index: int) -> bool:
        """Whether block ``index`` can be stepped from unsummed gradients, tile by tile: torch's
        fused SGD on the CPU, once a momentum buffer exists (its first step makes the buffer)."""
        group = self.opt.param_groups[0] if self.opt is not None else {}
        p = self.params[index]
        if not isinstance(self.opt, torch.optim.SGD) or not group.get("fused") or p.device.type != "cpu":
            return False
        return group["momentum"] == 0 or self.opt.state.get(p, {}).get("momentum_buffer") is not None

    def _step_tiles(self, tiled: Mapping[int, list[torch.Tensor]], scale: float) -> None:
        """torch's fused SGD kernel over TILE_BYTES of a block at a time, on the sum of that
        tile's gradients (added in the order given, as a whole-block sum adds them)."""
        group, rule = self.opt.param_groups[0], self._sgd_rule()
        for index, addends in tiled.items():
            p = self.params[index]
            buffer = self.opt.state[p]["momentum_buffer"] if group["momentum"] else None
            divisor = self._divisor(scale, p.device) if scale != 1.0 else None
            scratch = self._tile_scratch(p.dtype)
            tile = TILE_BYTES // p.element_size()
            for start in range(0, p.numel(), tile):
                end = min(start + tile, p.numel())
                grad = torch.add(addends[0][start:end], addends[1][start:end], out=scratch[:end - start])
                for more in addends[2:]:
                    grad.add_(more[start:end])
                torch._fused_sgd_([p[start:end]], [grad], [] if buffer is None else [buffer[start:end]],
                                  **rule, is_first_step=False, grad_scale=divisor, found_inf=None)

    def _sgd_rule(self) -> dict:
        group = self.opt.param_groups[0]
        return {k: group[k] for k in ("weight_decay", "momentum", "lr", "dampening", "nesterov", "maximize")}

    def _step_fused(self, stepped: list[torch.Tensor], scale: float) -> bool:
        """torch's fused SGD or Adam kernel on ``stepped`` (whose .grad is set), called as torch's
        ``step()`` calls it, without that step's walk over every block of this server (its checks,
        hooks and grad mode cost a CPU server about as much as the update of a small block).
        False where ``step()`` must run: another rule, a block's first step (which makes its
        state), options the direct call does not take, mixed devices or dtypes."""
        group = self.opt.param_groups[0]
        if not group.get("fused") or len(self.opt.param_groups) != 1 or len({(p.device, p.dtype) for p in stepped}) != 1:
            return False
        divisor = self._divisor(scale, stepped[0].device) if scale != 1.0 else None
        if type(self.opt) is torch.optim.SGD:
            return self._fused_sgd(stepped, group, divisor)
        if type(self.opt) is torch.optim.Adam:
            return self._fused_adam(stepped, group, divisor)
        return False

    def _fused_sgd(self, stepped: list[torch.Tensor], group: dict, divisor: Optional[torch.Tensor]) -> bool:
        buffers = [self.opt.state.get(p, {}).get("momentum_buffer") for p in stepped] if group["momentum"] else []
        if any(buffer is None for buffer in buffers):
            return False
        self._call_fused_sgd(stepped, [p.grad for p in stepped], buffers, divisor)
        return True

    def _call_fused_sgd(self, params: list, grads: list, buffers: list, divisor: Optional[torch.Tensor]) -> None:
        torch._fused_sgd_(params, grads, buffers, **self._sgd_rule(), is_first_step=False, grad_scale=divisor,
                          found_inf=None)

    def _fused_adam(self, stepped: list[torch.Tensor], group: dict, divisor: Optional[torch.Tensor]) -> bool:
        states = [self.opt.state.get(p, {}) for p in stepped]
        if not all({"step", "exp_avg", "exp_avg_sq"} <= state.keys() for state in states) or \
                not _adam_fits_fused_call(group):
            return False  # torch's step() makes a first step's state, or refuses what it cannot use
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1)
        _call_fused_adam(stepped, [p.grad for p in stepped], [state["exp_avg"] for state in states],
                         [state["exp_avg_sq"] for state in states], steps, group, divisor)
        return True

    def _tile_scratch(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scratch:
            self._scratch[dtype] = torch.empty(TILE_BYTES // dtype.itemsize, dtype=dtype)
        return self._scratch[dtype]

    def _divisor(self, scale: float, device: torch.device) -> torch.Tensor:
        """1 / scale as a tensor, made once: creating it on a GPU waits for the device."""
        key = (scale, device)
        if key not in self._divisors:
            self._divisors[key] = torch.tensor(1.0 / scale, device=device)
        return self._divisors[key]

    def _count_steps(self, stepped: list[torch.Tensor]) -> None:
        if not self.spec.torch_counts_steps:
            for p in stepped:
                state = self.opt.state[p]
                state["step"] = state.get("step", 0) + 1

    def _step_whole(self, grads: Mapping[int, torch.Tensor], scale: float) -> None:
        stepped = [self.params[index] for index in grads]
        copied_from_pinned = False
        try:
            for p, grad in zip(stepped, grads.values()):
                if grad.device != p.device or grad.dtype != p.dtype:
                    # A non-blocking copy into host memory may not have landed when the CPU
                    # optimizer reads it, so only copies onto an accelerator are asynchronous.
                    async_copy = p.device.type != "cpu"
                    copied_from_pinned |= async_copy and grad.is_pinned()
                    grad = grad.to(device=p.device, dtype=p.dtype, non_blocking=async_copy)
                p.grad = grad
            copied = torch.cuda.Event() if copied_from_pinned and stepped[0].is_cuda else None
            if copied is not None:
                copied.record()
            self._run(stepped, scale)
        finally:
            for p in stepped:
                p.grad = None
        self._count_steps(stepped)
        if copied is not None:
            # A pinned source is copied asynchronously; the caller may reuse it once we return.
            copied.synchronize()

    def _run(self, stepped: list[torch.Tensor], scale: float) -> None:
        """torch's step over the params in ``stepped`` (whose .grad is set)."""
        assert self.opt is not None
        if self._step_fused(stepped, scale):
            return
        fused = bool(self.opt.param_groups[0].get("fused"))
        if scale != 1.0 and not fused:
            torch._foreach_mul_([p.grad for p in stepped], scale)
        if scale != 1.0 and fused:
            # the fused kernels divide each gradient by grad_scale (as set by torch's GradScaler)
            # as they read it: the mean over the workers costs no pass of its own
            self.opt.grad_scale = self._divisor(scale, stepped[0].device)
        # torch's fused SGD steps either only params with a momentum buffer or only params
        # without one, so blocks stepped for the first time go on their own
        has_state = [bool(self.opt.state.get(p)) for p in stepped]
        grads = [p.grad for p in stepped]
        try:
            for with_state in sorted(set(has_state)):
                for p, grad, has in zip(stepped, grads, has_state):
                    p.grad = grad if has == with_state else None
                self.opt.step()
        finally:
            for p, grad in zip(stepped, grads):
                p.grad = grad
            if hasattr(self.opt, "grad_scale"):
                del self.opt.grad_scale

    def state_dict(self) -> dict[str, Any]:
        """The torch optimizer's state_dict (block indices stand for the params)."""
        if self.opt is None:
            return {"state": {}, "param_groups": []}
        return self.opt.state_dict()

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore state saved by ``state_dict``, possibly from another device or implementation."""
        if self.opt is None:
            return
        # torch.optim keeps the given state tensors as they are when device and dtype already
        # match, so without a copy two optimizers loaded from one dict would share buffers.
        d = copy.deepcopy(dict(d))
        self._runs.clear()  # the state tensors are replaced
        ours = self.opt.param_groups
        impl = ("fused", "foreach", "capturable", "differentiable")
        groups = [
            {**g, **{k: mine[k] for k in impl if k in mine}}
            for g, mine in zip(d["param_groups"], ours)
        ]
        self.opt.load_state_dict({"state": d["state"], "param_groups": groups})
        for group in self.opt.param_groups:
            on_device = group.get("fused") or group.get("capturable")
            for p in group["params"]:
                step = self.opt.state.get(p, {}).get("step")
                if isinstance(step, torch.Tensor):
                    want = p.device if on_device else torch.device("cpu")
                    if step.device != want:
                        self.opt.state[p]["step"] = step.to(want)

    def steps_of(self, index: int) -> int:
        """How many updates block ``index`` has received."""
        if self.opt is None:
            raise BadRequestError(f"no block {index}: this server holds none")
        step = self.opt.state.get(self.params[index], {}).get("step", 0)
        return int(step)
