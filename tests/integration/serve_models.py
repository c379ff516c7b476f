"""Models for the ps-serve tests: ``tests.integration.serve_models:FACTORY``."""

from __future__ import annotations

import torch


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model.input_shape = (4,)
    return model


class Square(torch.nn.Module):
    """Two bias-free layers: with every weight equal to v, ones(4) gives 16 v^2; layers of two
    versions v and v+1 would give 16 v (v+1)."""

    input_shape = (4,)

    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(4, 4, bias=False)
        self.second = torch.nn.Linear(4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


def square() -> torch.nn.Module:
    return Square()


def broken() -> torch.nn.Module:
    model = mlp()
    model.forward = lambda x: "not a tensor"
    return model


class Tables(torch.nn.Module):
    """Two ps.nn tables under a dense head. One example is 4 int64 ids: two users (any id: a hashed
    table) and two items (ids 0..49)."""

    input_shape = (4,)

    def __init__(self):
        super().__init__()
        import psframework as ps

        torch.manual_seed(1)
        self.users = ps.nn.EmbeddingBag(None, 4, mode="sum")
        self.items = ps.nn.Embedding(50, 3)
        self.head = torch.nn.Linear(7, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.users(x[:, :2]), self.items(x[:, 2:]).sum(1)], dim=1))


def tables() -> torch.nn.Module:
    return Tables()
