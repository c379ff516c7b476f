"""Which blocks a worker exchanges where its tensors lie (``worker/direct.py``), on real shared host
memory: the regions a request names, and when it names none."""

from __future__ import annotations

import torch

from psframework.worker.direct import DirectExchange, one_region


def _accepting(server: int = 0) -> DirectExchange:
    direct = DirectExchange(rank=0)
    direct.answered(server, on_device=False, accepted=True)
    return direct


def test_one_region_needs_pieces_one_after_another_in_order():
    flat = torch.zeros(10)
    assert one_region([flat[:3], flat[3:7], flat[7:]]).data_ptr() == flat.data_ptr()
    assert one_region([flat[3:7], flat[:3]]) is None  # out of order
    assert one_region([flat[:3], flat[4:7]]) is None  # a gap
    assert one_region([flat.view(2, 5).t()]) is None  # not contiguous


def test_gradients_and_destination_in_shared_memory_are_both_named_and_each_export_once():
    direct = _accepting()
    try:
        grad, value = direct.shared_empty(100, torch.float32), direct.shared_empty(100, torch.float32)
        regions = direct.regions(0, False, [grad[:40], grad[40:]], [value[:40], value[40:]])
        assert regions.writes and len(regions.direct) == 4
        assert regions.direct[1] == 0 and regions.direct[3] == 0
        assert len({export_id for export_id, _, _ in regions.exports}) == 2
        again = direct.regions(0, False, [grad[:40], grad[40:]], [value[:40], value[40:]])
        assert again.direct == regions.direct and again.gone == []
    finally:
        direct.close()


def test_a_destination_not_mapped_or_not_to_be_written_leaves_the_gradients_alone_named():
    direct = _accepting()
    try:
        grad, value = direct.shared_empty(100, torch.float32), direct.shared_empty(100, torch.float32)
        assert len(direct.regions(0, False, [grad], [torch.zeros(100)]).direct) == 2
        assert len(direct.regions(0, False, [grad], None).direct) == 2
        direct.write_values = False  # a DistributedOptimizer whose parameters are not all views
        assert not direct.regions(0, False, [grad], [value]).writes
    finally:
        direct.close()


def test_nothing_is_named_to_a_server_that_did_not_accept_or_for_ordinary_gradients():
    direct = _accepting(server=0)
    try:
        grad = direct.shared_empty(100, torch.float32)
        assert direct.regions(1, False, [grad], None) is None  # server 1 did not accept
        assert direct.regions(0, False, [torch.zeros(100)], None) is None  # not in shared memory
        assert direct.regions(0, True, [grad], None) is None  # a device lane's request
        direct.answered(0, on_device=False, accepted=False)  # a restarted server that refuses
        assert direct.regions(0, False, [grad], None) is None
        off = DirectExchange(rank=0, enabled=False)
        off.answered(0, on_device=False, accepted=True)
        assert off.regions(0, False, [off.shared_empty(10, torch.float32)], None) is None
        off.close()
    finally:
        direct.close()
