"""Update semantics end to end, through real server processes: what a worker pulls after pushes.

The server applies pushes straight from the received messages (and sums sync pushes into the
first one), so these check the arithmetic over multi-block tensors, small misaligned frames,
float64 blocks and empty tensors.
"""
from __future__ import annotations

import threading

import pytest
import torch

import psframework as ps

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _train(mode: str, num_workers: int, steps: int = 3) -> dict[int, dict[str, torch.Tensor]]:
    results: dict[int, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []
    # 1 KiB chunks: "a" spans several blocks on both servers, the small tensors share blocks
    with ps.LocalCluster(num_servers=2, num_workers=num_workers, mode=mode, chunk_bytes=1024) as cluster:

        def work(rank: int) -> None:
            try:
                with ps.init(scheduler=cluster.scheduler, rank=rank, timeout=30) as worker:
                    params = {"a": torch.arange(1000, dtype=torch.float32),
                              "b": torch.ones(3, 5, dtype=torch.float64),
                              "c": torch.ones(5, dtype=torch.float64),
                              "empty": torch.zeros(0)}
                    worker.register(params, optimizer=ps.optim.SGD(lr=0.5))
                    for _ in range(steps):
                        grads = {k: torch.full_like(v, float(rank + 1)) for k, v in params.items()}
                        worker.push_pull(grads, into=params).wait(timeout=30)
                    worker.barrier(timeout=30)
                    worker.pull(params).wait(timeout=30)
                    results[rank] = params
            except BaseException as exc:  # surfaced below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(r,)) for r in range(num_workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert not errors, errors
    assert len(results) == num_workers
    return results


def test_sync_applies_the_mean_gradient_once_per_step():
    for params in _train("sync", 2).values():
        shift = 3 * 0.5 * (1 + 2) / 2
        assert torch.equal(params["a"], torch.arange(1000, dtype=torch.float32) - shift)
        assert torch.equal(params["b"], torch.full((3, 5), 1 - shift, dtype=torch.float64))
        assert torch.equal(params["c"], torch.full((5,), 1 - shift, dtype=torch.float64))
        assert params["empty"].numel() == 0


def test_async_applies_every_push():
    for params in _train("async", 2).values():
        shift = 3 * 0.5 * (1 + 2)
        assert torch.equal(params["a"], torch.arange(1000, dtype=torch.float32) - shift)
        assert torch.equal(params["c"], torch.full((5,), 1 - shift, dtype=torch.float64))
