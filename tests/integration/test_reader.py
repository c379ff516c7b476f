"""``ps.Reader``: read a job's values while it trains, without taking part (issue 17)."""

from __future__ import annotations


import torch

import psframework as ps
from tests.conftest import WorkerProcs

SHAPES = {"a": (5, 3), "b": (40,), "c": (7,)}


def _tensors(value: float = 0.0) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def _steps(worker, params: dict[str, torch.Tensor], n: int) -> None:
    """``n`` sync steps of SGD(lr=1) with gradient -1 everywhere: every value goes up by 1 a step."""
    for _ in range(n):
        worker.push_pull({k: -torch.ones_like(v) for k, v in params.items()}, into=params).wait(timeout=30)


def test_a_snapshot_holds_the_values_and_the_step_of_a_sync_job(make_cluster):
    """Two servers, tensors over several blocks (one split between servers): after three steps a
    snapshot holds exactly the worker's values and says step 3; the reader does not count in the
    job's steps (one worker steps on alone) and its snapshot leaves the values untouched."""
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", chunk_bytes=64)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = _tensors()
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            assert len({block.server for block in reader.shard_map.blocks}) == 2
            got = _tensors(-1.0)
            assert reader.snapshot(got) == 0 and torch.equal(got["b"], torch.zeros(40))
            _steps(worker, params, 3)
            version = reader.snapshot(got)
            assert version == 3 and version.consistent and version.tensors == {"a": 3, "b": 3, "c": 3}
            for name in SHAPES:
                assert torch.equal(got[name], params[name]) and torch.equal(got[name], torch.full(SHAPES[name], 3.0))
            _steps(worker, params, 1)  # the reader's reads are no pushes: the step is the worker's alone
            assert reader.snapshot({"c": got["c"]}) == 4 and torch.equal(got["c"], torch.full((7,), 4.0))
        stats = worker.server_stats()
        assert sum(s["reads"] for s in stats) > 0 and sum(s["pushes"] for s in stats) == 4 * len(reader.shard_map.blocks)


def test_snapshots_taken_while_two_workers_train_are_never_torn_nor_mixed(make_cluster, tmp_path):
    """Two worker processes train continuously in sync mode, every value going up by one a step
    (so a value is its step); every snapshot taken meanwhile holds one step in all of its elements,
    over three blocks on two servers, and that step is the version it names."""
    cluster = make_cluster(num_servers=2, num_workers=2, mode="sync", chunk_bytes=4096)
    procs = WorkerProcs(cluster, "count_up", 2, tmp_path, steps=100000, numel=3000)
    try:
        with ps.Reader(scheduler=cluster.scheduler, timeout=20) as reader:
            assert len(reader.shard_map.blocks) >= 3
            dest = {"w": torch.empty(3000), "v": torch.empty(1000)}
            seen = []
            while len(seen) < 30 or seen[-1] - seen[0] < 5:
                version = reader.snapshot(dest)
                for name, tensor in dest.items():
                    assert torch.equal(tensor, torch.full_like(tensor, float(version))), (name, version, tensor.unique())
                seen.append(int(version))
            assert seen == sorted(seen) and seen[-1] > seen[0]
    finally:
        procs.stop()
