"""Update rules for the rows of an embedding table: torch's sparse math, on the touched rows only.

Each rule updates ``values[slots]`` (and its state slabs) from the coalesced gradients of those
rows, with the same expressions, in the same order, as torch's optimizer on a sparse gradient:

- ``sgd``: ``w -= lr * g`` (``weight_decay``: ``+ wd * w`` on the touched rows only; torch's SGD
  would decay every row, which no parameter server does);
- ``adagrad``: element-wise, as ``torch.optim.Adagrad`` on a sparse gradient;
- ``rowwise_adagrad``: one accumulator per row, ``s += mean(g^2)``, ``w -= lr * g / (sqrt(s) + eps)``;
- ``sparse_adam``: as ``torch.optim.SparseAdam`` (lazy: only the touched rows' moments change),
  bias correction by the table's step count.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..errors import ConfigError
from ..optim import Adagrad, OptimizerSpec, RowWiseAdagrad, SGD, SparseAdam

Slabs = dict[str, torch.Tensor]


def state_shapes(spec: OptimizerSpec, dim: int) -> dict[str, tuple[int, ...]]:
    """The per-row state a rule keeps: slab name -> shape of one row's part."""
    if isinstance(spec, SGD):
        return {}
    if isinstance(spec, Adagrad):
        return {"sum": (dim,)}
    if isinstance(spec, RowWiseAdagrad):
        return {"row_sum": ()}
    if isinstance(spec, SparseAdam):
        return {"exp_avg": (dim,), "exp_avg_sq": (dim,)}
    raise ConfigError(f"{type(spec).__name__} is not an update rule for embedding tables; use ps.optim.SGD, "
                      "Adagrad, RowWiseAdagrad or SparseAdam")


def check_rule(spec: OptimizerSpec) -> None:
    state_shapes(spec, 1)
    if isinstance(spec, SGD) and (spec.momentum or spec.nesterov or spec.dampening):
        raise ConfigError("SGD for embedding tables takes lr and weight_decay only (no momentum): a row's "
                          "momentum would have to move on steps that do not touch it")


def _sgd(spec: SGD, values: torch.Tensor, state: Slabs, slots: torch.Tensor, grads: torch.Tensor, step: int):
    if spec.weight_decay:
        grads = grads.add(values[slots], alpha=spec.weight_decay)
    values.index_add_(0, slots, grads, alpha=-spec.lr)  # slots are distinct: torch's sparse add_, in place


def _adagrad(spec: Adagrad, values, state, slots, grads, step):
    total = state["sum"][slots].add(grads.pow(2))
    state["sum"][slots] = total
    std = total.sqrt().add_(spec.eps)
    values[slots] = values[slots].add(grads / std, alpha=-spec.lr)


def _rowwise_adagrad(spec: RowWiseAdagrad, values, state, slots, grads, step):
    total = state["row_sum"][slots].add(grads.pow(2).mean(dim=1))
    state["row_sum"][slots] = total
    values[slots] = values[slots].add(grads / (total.sqrt() + spec.eps)[:, None], alpha=-spec.lr)


def _sparse_adam(spec: SparseAdam, values, state, slots, grads, step):
    beta1, beta2 = spec.betas
    old_exp_avg = state["exp_avg"][slots]
    exp_avg_update = grads.sub(old_exp_avg).mul_(1 - beta1)
    state["exp_avg"][slots] = old_exp_avg + exp_avg_update
    old_exp_avg_sq = state["exp_avg_sq"][slots]
    exp_avg_sq_update = grads.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
    state["exp_avg_sq"][slots] = old_exp_avg_sq + exp_avg_sq_update
    numer = exp_avg_update.add_(old_exp_avg)
    denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(spec.eps)
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = spec.lr * math.sqrt(bias_correction2) / bias_correction1
    values[slots] = values[slots] + (-step_size * numer.div_(denom))


_RULES: dict[type, Callable] = {SGD: _sgd, Adagrad: _adagrad, RowWiseAdagrad: _rowwise_adagrad,
                                SparseAdam: _sparse_adam}


def apply_rule(spec: OptimizerSpec, values: torch.Tensor, state: Slabs, slots: torch.Tensor,
               grads: torch.Tensor, step: int) -> None:
    """One update of the rows ``slots`` (distinct) with their gradients; ``step`` counts from 1."""
    _RULES[type(spec)](spec, values, state, slots, grads, step)


__all__ = ["apply_rule", "check_rule", "state_shapes"]
