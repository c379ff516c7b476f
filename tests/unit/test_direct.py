"""Which blocks a worker exchanges where its tensors lie (``worker/direct.py``), on real shared host
memory: the regions a request names, and when it names none."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from psframework.worker.direct import DirectExchange, one_region
from psframework import protocol as P
from psframework.worker.exchange import _direct_answered, _held_until_flag, _tell_gone_again


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


def test_exports_go_direct_once_their_server_said_it_maps_them_and_those_it_refused_never():
    """Each export is introduced to a server once, without waiting, before a request names it; its
    blocks go through the lane until the server answered that it maps it. A refused destination
    leaves the gradients named alone; an introduction that got no answer (a rollback) is made
    again, and so is every one to a restarted server."""
    asked = []

    def introduce(server, on_device, exports, gone, answered):
        asked.append(([export_id for export_id, _, _ in exports], answered))

    direct = DirectExchange(rank=0, introduce=introduce)
    direct.answered(0, on_device=False, accepted=True)
    try:
        grad, value = direct.shared_empty(100, torch.float32), direct.shared_empty(100, torch.float32)
        assert direct.regions(0, False, [grad], [value]) is None and [ids for ids, _ in asked] == [[1, 2]]
        assert direct.regions(0, False, [grad], [value]) is None and len(asked) == 1  # asked once
        asked[0][1]([2])  # it maps the gradients' export, not the destination's
        regions = direct.regions(0, False, [grad], [value])
        assert not regions.writes and len(regions.direct) == 2 and len(asked) == 1
        other = direct.shared_empty(100, torch.float32)
        assert direct.regions(0, False, [other], None) is None and asked[-1][0] == [3]
        asked[-1][1](None)  # no answer came
        assert direct.regions(0, False, [other], None) is None and len(asked) == 3 and asked[-1][0] == [3]
        asked[-1][1]([])
        assert direct.regions(0, False, [other], None).direct[1] == 0
        direct.answered(0, on_device=False, accepted=True)  # the server restarted
        assert direct.regions(0, False, [other], None) is None and asked[-1][0] == [3]
    finally:
        direct.close()


def test_memory_let_go_is_told_with_the_next_introduction_even_if_nothing_goes_direct():
    """Memory made anew every step goes through the lane each time (its introduction is answered
    only later), yet the server hears of what was let go with the next introduction, also of an
    export whose introduction got no answer (the server may have mapped it); a server that
    refuses the message itself is not named our memory again."""
    asked = []

    def introduce(server, on_device, exports, gone, answered):
        asked.append(([export_id for export_id, _, _ in exports], gone, answered))

    direct = DirectExchange(rank=0, introduce=introduce)
    direct.answered(0, on_device=False, accepted=True)
    try:
        first = direct.shared_empty(100, torch.float32)
        assert direct.regions(0, False, [first], None) is None
        asked[-1][2](None)  # no answer came: a rollback
        direct.free([first])
        direct.sweep()
        second = direct.shared_empty(100, torch.float32)
        assert direct.regions(0, False, [second], None) is None and asked[-1][:2] == ([2], [1])
        asked[-1][2](None, accepted=False)  # the server refused the message
        assert not direct.accepts(0, False) and direct.regions(0, False, [second], None) is None and len(asked) == 2
    finally:
        direct.close()


def test_memory_let_go_is_still_told_after_an_introduction_that_could_not_be_sent():
    """An introduction that raised (its message never left) keeps the exports gone for the next."""
    asked, fail = [], [False]

    def introduce(server, on_device, exports, gone, answered):
        if fail[0]:
            fail[0] = False
            raise OSError("the socket is gone")
        asked.append(([export_id for export_id, _, _ in exports], gone))

    direct = DirectExchange(rank=0, introduce=introduce)
    direct.answered(0, on_device=False, accepted=True)
    try:
        first = direct.shared_empty(100, torch.float32)
        assert direct.regions(0, False, [first], None) is None and asked[-1] == ([1], [])
        direct.free([first])
        direct.sweep()
        fail[0] = True
        second = direct.shared_empty(100, torch.float32)
        with pytest.raises(OSError):
            direct.regions(0, False, [second], None)
        assert direct.regions(0, False, [second], None) is None and asked[-1] == ([2], [1])
    finally:
        direct.close()


class _Regions:
    """``DirectExchange.regions`` as a GPU worker's would answer: regions where the pieces are one."""

    def __init__(self):
        self.asked = []

    def regions(self, server, on_device, sources, dests):
        self.asked.append((server, on_device, sources, dests))
        return "regions" if one_region(sources) is not None and one_region(dests) is not None else None


def _gathering_exchange(tensors: dict[str, torch.Tensor], dests: dict[str, torch.Tensor]):
    """A packed block of ``tensors`` (in order) and an exchange's state, as ``Exchange`` keeps it,
    with every piece gathered in reverse order (the order a backward pass hands them over)."""
    from types import SimpleNamespace

    from psframework.sharding import Block, Segment
    from psframework.worker.exchange import Destination

    segments, filled = [], 0
    for name, tensor in tensors.items():
        segments.append(Segment(name, 0, tensor.numel(), filled))
        filled += tensor.numel()
    block = Block(7, 0, "float32", filled, tuple(segments))
    parts = [(i, seg, seg.key) for i, seg in enumerate(segments)]
    exchange = SimpleNamespace(
        _blocks={7: (block, parts)}, _dests={name: Destination(d) for name, d in dests.items()}, _direct={},
        _lane_blocks={7: "lane"}, _unlaunched={}, worker=SimpleNamespace(lanes=SimpleNamespace(direct=_Regions())),
        _gathered={7: [(seg, tensors[seg.key].view(-1), f"after {seg.key}") for seg in reversed(segments)]})
    return exchange, block


def test_a_packed_block_gathered_in_one_region_goes_direct_in_the_blocks_order(monkeypatch):
    """The pieces of a GPU block of several segments are gathered as they are added; once the block
    is complete it goes direct if its gradients (and destination) lie one after another, naming
    them in the block's order with each piece's event, and nothing is copied."""
    from psframework.worker import exchange as exchange_mod

    grads, values = torch.arange(6.0), torch.zeros(6)
    exchange, block = _gathering_exchange({"a": grads[:2], "b": grads[2:5], "c": grads[5:]},
                                          {"a": values[:2], "b": values[2:5], "c": values[5:]})
    exchange_mod._settle_gathered(exchange, 7)
    regions, sources, afters = exchange._direct[7]
    assert regions == "regions" and afters == ["after a", "after b", "after c"]
    assert [s.data_ptr() for s in sources] == [grads[:2].data_ptr(), grads[2:5].data_ptr(), grads[5:].data_ptr()]
    assert exchange._unlaunched == {} and exchange._gathered == {}


def test_a_packed_block_not_in_one_region_or_not_whole_is_copied_into_its_push_slot(monkeypatch):
    """Gradients that do not lie one after another, or a block one of whose pieces was not gathered
    (no gradient, or host memory), take the lane: the gathered pieces are queued for their copies
    into the push slot, in one launch with the rest."""
    from psframework.worker import exchange as exchange_mod

    monkeypatch.setattr(exchange_mod, "slot_piece", lambda lane, pull, block, seg, dtype: torch.empty(seg.numel))
    apart = {"a": torch.ones(2), "b": torch.ones(3)}
    exchange, _ = _gathering_exchange(apart, {"a": torch.zeros(2), "b": torch.zeros(3)})
    exchange_mod._settle_gathered(exchange, 7)
    targets, sources, blocks = exchange._unlaunched[torch.device("cpu")]
    assert len(targets) == len(sources) == 2 and blocks == {7} and exchange._direct == {}

    grads = torch.arange(5.0)
    exchange, _ = _gathering_exchange({"a": grads[:2], "b": grads[2:]}, {})
    exchange._gathered[7].pop()  # "a" had no gradient
    exchange_mod._settle_gathered(exchange, 7)
    assert exchange.worker.lanes.direct.asked == [] and exchange._direct == {}
    assert len(exchange._unlaunched[torch.device("cpu")][0]) == 1


class _FakeCudaTensor:
    """A GPU tensor as ``_held_until_flag`` sees it: which storage it views, and its records."""

    is_cuda = True

    def __init__(self, storage: int, recorded: list):
        self._storage, self._recorded = storage, recorded

    def untyped_storage(self):
        return SimpleNamespace(data_ptr=lambda: self._storage)

    def record_stream(self, stream) -> None:
        self._recorded.append((self._storage, stream.cuda_stream))


def test_a_flagged_direct_block_records_each_allocation_on_each_stream_once():
    """A block of many segments, all views of one gradient buffer and one parameter buffer, copied
    on one stream: each allocation is recorded once, not once per segment and source (the GPT
    step's worker spent more time in ``record_stream`` than in the rest of its step)."""
    recorded: list = []
    segments = 200
    stream = SimpleNamespace(cuda_stream=7, device=torch.device("cuda", 0))
    sources = [_FakeCudaTensor(1, recorded) for _ in range(segments)]
    copies = [SimpleNamespace(stream=stream, target=_FakeCudaTensor(2, recorded)) for _ in range(segments)]
    exchange = SimpleNamespace(_direct={5: (None, sources, [])})
    _held_until_flag(exchange, SimpleNamespace(block_id=5), copies)
    assert sorted(recorded) == [(1, 7), (2, 7)]


def test_memory_let_go_is_told_again_when_the_request_that_carried_it_failed_or_never_left():
    """The exports gone ride on the next direct request; if it failed (the server may not have
    read them) or was dropped unsent, the one after carries them again (a server forgets ids it
    does not know), so the server never keeps mapping memory we let go of."""
    direct = DirectExchange(rank=0, introduce=lambda server, on_device, exports, gone, answered: answered([]))
    direct.answered(0, on_device=False, accepted=True)
    try:
        first, second = direct.shared_empty(100, torch.float32), direct.shared_empty(100, torch.float32)
        for tensor in (first, second):  # introduced, and answered at once
            assert direct.regions(0, False, [tensor], None).gone == []
        direct.free([first])
        direct.sweep()
        carried = direct.regions(0, False, [second], None)
        assert carried.gone == [1]
        error = P.Error(kind=P.BAD_REQUEST, message="refused", req=1)
        _direct_answered(direct, carried, False, lambda *_: None, SimpleNamespace(server=0), error, False)
        again = direct.regions(0, False, [second], None)
        assert again.gone == [1]
        _direct_answered(direct, again, False, lambda *_: None, SimpleNamespace(server=0), P.Ack(req=2), True)
        assert direct.regions(0, False, [second], None).gone == []
        told = []  # a GPU block placed for the direct exchange (``Exchange._direct``), dropped unsent
        dropped = SimpleNamespace(worker=SimpleNamespace(lanes=SimpleNamespace(direct=SimpleNamespace(
            untake_gone=lambda *args: told.append(args)))), _sent={5}, _direct={4: (carried, [], []), 5: (again, [], [])},
            _blocks={4: (SimpleNamespace(server=0), []), 5: (SimpleNamespace(server=0), [])})
        _tell_gone_again(dropped)
        assert told == [(0, True, [1])]
    finally:
        direct.close()
