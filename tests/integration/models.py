"""A tiny model used by both worker processes and the single-process reference in tests."""

from __future__ import annotations

import time

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


class _SlowBackward(torch.autograd.Function):
    """Identity whose backward sleeps: the layers before it get their gradients late."""

    @staticmethod
    def forward(ctx, x, seconds):
        ctx.seconds = seconds
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        if ctx.seconds:
            time.sleep(ctx.seconds)
        return grad, None


class OverlapNet(torch.nn.Module):
    """Enough layers for several blocks at CHUNK = 4 KiB (``mid.weight`` alone is 16 KiB), an unused
    parameter (so step() must push zeros for it), and an optional pause in the backward pass just
    before the first layer's gradients, so the later layers' blocks are sent first."""

    def __init__(self, slow_backward: float = 0.0):
        super().__init__()
        self.first = torch.nn.Linear(8, 64)
        self.mid = torch.nn.Linear(64, 64)
        self.last = torch.nn.Linear(64, 1)
        self.unused = torch.nn.Linear(3, 3)
        self.slow_backward = slow_backward

    def forward(self, x):
        h = _SlowBackward.apply(torch.tanh(self.first(x)), self.slow_backward)
        return self.last(torch.tanh(self.mid(h)))


def overlap_batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(16, 8, generator=g), torch.randn(16, 1, generator=g)


def overlap_reference(steps: int) -> dict[str, torch.Tensor]:
    """One process, the whole batch, torch.optim.SGD: what the distributed runs must match."""
    torch.manual_seed(0)
    model = OverlapNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(steps):
        x, y = overlap_batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


class Routed(torch.nn.Module):
    """A shared layer, and a branch that only the flagged samples go through: on a step where no
    sample of a worker's batch is flagged, that worker has no gradient for the branch."""

    def __init__(self):
        super().__init__()
        self.main = torch.nn.Linear(6, 3)
        self.branch = torch.nn.Linear(6, 3)

    def forward(self, x, flags):
        out = self.main(x)
        if flags.any():
            out = out + torch.where(flags[:, None], self.branch(x), torch.zeros_like(out))
        return out


# which halves of the batch (worker 0's, worker 1's) have flagged samples, step by step
ROUTED_FLAGS = [(True, True), (True, False), (False, False), (False, True), (False, False), (True, True)]


def routed_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3000 + step)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    flags = torch.zeros(8, dtype=torch.bool)
    first, second = ROUTED_FLAGS[step]
    flags[1], flags[5] = first, second
    return x, y, flags


ROUTED_OPTIMIZERS = {"sgd": ps.optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), "adam": ps.optim.Adam(lr=0.05)}


def routed_reference(optimizer: str) -> dict[str, torch.Tensor]:
    """One process, whole batches: torch skips the branch on the steps where nobody uses it."""
    torch.manual_seed(0)
    model = Routed()
    spec = ROUTED_OPTIMIZERS[optimizer]
    opt = spec.torch_class(model.parameters(), **spec.hyperparameters())
    for step in range(len(ROUTED_FLAGS)):
        x, y, flags = routed_batch(step)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x, flags), y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------- tables

EMB_ROWS, EMB_DIM, EMB_BAGS, EMB_BAG = 30, 6, 6, 4
SPARSE_RULES = {"sparse_adam": ps.optim.SparseAdam(lr=0.05), "sgd": ps.optim.SGD(lr=0.3),
                "adagrad": ps.optim.Adagrad(lr=0.2)}


def emb_weight() -> torch.Tensor:
    return torch.randn(EMB_ROWS, EMB_DIM, generator=torch.Generator().manual_seed(7))


def emb_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """6 bags of 4 ids each (2-D input), ids repeating within and across bags; weights; targets."""
    g = torch.Generator().manual_seed(4000 + step)
    ids = torch.randint(0, EMB_ROWS // 3, (EMB_BAGS, EMB_BAG), generator=g) * 3 % EMB_ROWS
    return ids, torch.rand(EMB_BAGS, EMB_BAG, generator=g), torch.randn(EMB_BAGS, 1, generator=g)


class EmbNet(torch.nn.Module):
    """An EmbeddingBag (ps.nn or torch's, sparse) and a linear layer on top."""

    def __init__(self, bag: torch.nn.Module):
        super().__init__()
        torch.manual_seed(3)
        self.bag = bag
        self.head = torch.nn.Linear(EMB_DIM, 1)

    def forward(self, ids, weights=None):
        return self.head(self.bag(ids, per_sample_weights=weights))


def emb_reference(rule: str, mode: str, weighted: bool, steps) -> dict[str, torch.Tensor]:
    """One process, whole batches: torch's EmbeddingBag(sparse=True) with the matching sparse
    optimizer; ``steps``: how many, or which batches in order. torch has no sparse gradient for
    ``mode="max"``: there its dense one, for optimizers that leave a row without gradient as it is."""
    model = EmbNet(torch.nn.EmbeddingBag.from_pretrained(emb_weight(), freeze=False, mode=mode,
                                                         sparse=mode != "max"))
    spec = SPARSE_RULES[rule]
    sparse = spec.torch_class([model.bag.weight], **spec.hyperparameters())
    dense = torch.optim.SGD(model.head.parameters(), lr=0.1)
    for step in (range(steps) if isinstance(steps, int) else steps):
        ids, weights, y = emb_batch(step)
        sparse.zero_grad()
        dense.zero_grad()
        torch.nn.functional.mse_loss(model(ids, weights if weighted else None), y).backward()
        sparse.step()
        dense.step()
    return {"weight": model.bag.weight.detach().clone(), "head.weight": model.head.weight.detach().clone(),
            "head.bias": model.head.bias.detach().clone()}
