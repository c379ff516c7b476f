"""Embedding tables on the servers: equal to torch, exact in async, admission and eviction as
specified, checkpoints with tables, and bad input refused."""

from __future__ import annotations

import pytest
import torch

import psframework as ps
from tests.integration import models

STEPS = 20


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("rule,mode,weighted", [
    ("sparse_adam", "sum", False), ("sparse_adam", "mean", False), ("sparse_adam", "sum", True),
    ("sgd", "mean", False), ("adagrad", "sum", True),
])
def test_sync_tables_equal_single_process_torch(make_cluster, worker_procs, workers, rule, mode, weighted):
    cluster = make_cluster(num_servers=2, num_workers=workers, mode="sync")
    results = worker_procs(cluster, "emb_train", workers, rule=rule, mode=mode, weighted=weighted,
                           steps=STEPS).join(timeout=120)
    want = models.emb_reference(rule, mode, weighted, STEPS)
    assert not torch.allclose(want["weight"], models.emb_weight()), "the reference must have moved the rows"
    for got in results:
        assert got["steps"] == STEPS
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}: {m}")
