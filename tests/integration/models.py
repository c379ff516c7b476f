"""A tiny model used by both worker processes and the single-process reference in tests."""

from __future__ import annotations

import torch

import psframework as ps

IN, OUT, BATCH = 64, 40, 12  # W (64x40 fp32 = 10 KiB) is split across servers at 4 KiB chunks


def make_params(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "W": torch.randn(IN, OUT, generator=g) * 0.1,
        "b": torch.randn(OUT, generator=g) * 0.1,
        "scale": torch.ones(()) + 0.1 * torch.randn((), generator=g),  # 0-dim
        "shift": torch.randn(1, generator=g) * 0.1,  # 1 element
    }


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, IN, generator=g), torch.randn(BATCH, OUT, generator=g)


def loss_fn(params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = (x @ params["W"] + params["b"]) * params["scale"] + params["shift"]
    return ((out - y) ** 2).mean()


def optimizer_spec(name: str):
    return {
        "sgd": ps.optim.SGD(lr=0.05, momentum=0.9),
        "adam": ps.optim.Adam(lr=1e-2),
        "adagrad": ps.optim.Adagrad(lr=0.1),
    }[name]


def torch_optimizer(name: str, params):
    spec = optimizer_spec(name)
    return spec.torch_class(params, **spec.hyperparameters())


def reference(name: str, steps: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """One process training on the whole batch (mean loss) with torch.optim."""
    params = {k: v.clone().requires_grad_(True) for k, v in make_params(seed).items()}
    opt = torch_optimizer(name, list(params.values()))
    for step in range(steps):
        opt.zero_grad()
        loss_fn(params, *batch(step)).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}
