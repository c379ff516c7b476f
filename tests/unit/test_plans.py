"""What a worker's exchanges share from step to step (``worker/plans.py``)."""

from __future__ import annotations

import torch

from psframework.sharding import TensorSpec, assign_shards
from psframework.worker.plans import ExchangePlans, layout_of


def _shard_map():
    specs = [TensorSpec.of(f"t{i}", torch.zeros(300 + 17 * i)) for i in range(12)]
    return assign_shards(specs, 2, chunk_bytes=4096)


def test_a_layout_holds_every_piece_of_the_names_once_in_segment_order():
    shard_map = _shard_map()
    names = ("t3", "t0", "t7")
    layout = layout_of(shard_map, names)
    pieces = sorted((block.block_id, i) for name in names for block, i, _ in shard_map.pieces_of(name))
    assert sorted((block_id, i) for block_id, (_, parts) in layout.items() for i, _, _ in parts) == pieces
    for block_id, (block, parts) in layout.items():
        assert block.block_id == block_id
        assert [i for i, _, _ in parts] == sorted(i for i, _, _ in parts)
        assert all(block.segments[i] is seg and seg.key == name for i, seg, name in parts)


def test_layouts_are_made_once_per_list_of_names_and_the_cache_stays_bounded():
    plans = ExchangePlans(_shard_map(), {})
    first = plans.layout(("t0", "t1"))
    assert plans.layout(("t0", "t1")) is first
    assert plans.layout(("t1", "t0")) is not first
    for i in range(200):
        plans.layout((f"t{i % 12}", f"t{(i * 5 + 1) % 12}", f"t{(i * 7 + 2) % 12}"))
    assert len(plans._layouts) <= 64


def test_a_destination_is_kept_for_the_registered_tensor_until_its_storage_moves():
    target = torch.zeros(4)
    plans = ExchangePlans(_shard_map(), {"t0": target})
    made = []

    def make():
        made.append(object())
        return made[-1]

    assert plans.destination("t0", target, make) is plans.destination("t0", target, make)
    assert len(made) == 1
    target.data = torch.ones(4)
    assert plans.destination("t0", target, make) is made[-1] and len(made) == 2
    assert plans.destination("t0", target, make) is made[-1] and len(made) == 2


def test_a_destination_for_another_tensor_is_made_every_time_and_not_kept():
    plans = ExchangePlans(_shard_map(), {"t0": torch.zeros(4)})
    other = torch.zeros(4)
    first = plans.destination("t0", other, object)
    assert plans.destination("t0", other, object) is not first
    assert plans._destinations == {}, "nothing of a tensor the worker does not hold is kept"


def test_the_destination_of_a_moved_tensor_is_dropped_at_the_next_exchange():
    target = torch.zeros(4)
    plans = ExchangePlans(_shard_map(), {"t0": target, "t1": torch.zeros(4)})
    plans.destination("t0", target, object)
    plans.destination("t1", plans._registered["t1"], object)
    target.data = torch.ones(4)  # e.g. model.cpu() after training on a GPU
    plans.drop_moved()
    assert list(plans._destinations) == ["t1"], "the view of the old storage is let go"
