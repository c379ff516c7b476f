"""The direct exchange on one host (``worker/direct.py``): a server reads a worker's gradients and
writes its values where they lie, in host memory that ``shared_empty`` made, against the lanes."""

from __future__ import annotations

import pytest
import torch

import psframework as ps
from psframework.datapath.lane import shm_available
from tests.integration import models
from tests.integration.test_core import CHUNK

pytestmark = pytest.mark.skipif(not shm_available(), reason="no memfd_create or /proc/PID/fd on this system")
STEPS = 3


def _shared_like(worker, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of ``tensors``, each in shared host memory of its own."""
    out = {}
    for name, tensor in tensors.items():
        out[name] = worker.lanes.direct.shared_empty(tensor.numel(), tensor.dtype).view(tensor.shape)
        out[name].copy_(tensor)
    return out


def _train(worker, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
    """``STEPS`` steps of the test model: gradients into ``grads``, pushed, values pulled into ``params``."""
    for step in range(STEPS):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        models.loss_fn(leaves, *models.batch(step)).backward()
        for name, leaf in leaves.items():
            grads[name].copy_(leaf.grad)
        worker.push_pull(grads, into=params).wait(timeout=30)


def _reference() -> dict[str, torch.Tensor]:
    params = {k: v.clone().requires_grad_(True) for k, v in models.make_params(0).items()}
    opt = torch.optim.SGD(list(params.values()), lr=0.1)
    for step in range(STEPS):
        opt.zero_grad()
        models.loss_fn(params, *models.batch(step)).backward()
        opt.step()
    return {k: v.detach() for k, v in params.items()}


@pytest.mark.parametrize("direct", ["1", "0"])
def test_shared_tensors_are_exchanged_where_they_lie_with_torchs_numbers(make_cluster, monkeypatch, direct):
    monkeypatch.setenv("PS_DIRECT", direct)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        start = models.make_params(0)
        worker.register(start, optimizer=ps.optim.SGD(lr=0.1))
        params = _shared_like(worker, start)
        grads = _shared_like(worker, {k: torch.zeros_like(v) for k, v in start.items()})
        _train(worker, params, grads)
        stats = worker.server_stats()
        # a block of one tensor's piece is one region; the packed block of three small tensors,
        # each in a file of its own here, is not: it goes through the lane
        single = [b for b in worker.shard_map.blocks if len(b.segments) == 1]
        assert 0 < len(single) < len(worker.shard_map.blocks)
        assert sum(s["direct_requests"] for s in stats) == (STEPS * len(single) if direct == "1" else 0)
        assert sum(s["lane_requests"] for s in stats) == STEPS * len(worker.shard_map.blocks)
        # every request names its exports' handles; each server opened each once: the values and the
        # gradient of each tensor it has a block of one segment of
        opened = 2 * len({(b.server, b.segments[0].key) for b in single})
        assert sum(s["mapped_exports"] for s in stats) == (opened if direct == "1" else 0)
    want = _reference()
    for name in want:
        torch.testing.assert_close(params[name], want[name], rtol=1e-5, atol=1e-6)


def test_ordinary_tensors_still_go_through_the_lanes(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", chunk_bytes=CHUNK)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = models.make_params(0)
        worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        start = {k: v.clone() for k, v in params.items()}
        worker.push_pull(grads, into=params).wait(timeout=30)
        stats = worker.server_stats()
        assert sum(s["direct_requests"] for s in stats) == 0
        assert sum(s["lane_requests"] for s in stats) == len(worker.shard_map.blocks)
    for key in params:
        torch.testing.assert_close(params[key], start[key] - 0.5)
