"""The dense store's sums (``server/store.py``)."""

from __future__ import annotations

import torch

from psframework.compress import BF16, Int8
from psframework.server.store import BlockState, _distinct_totals


def test_adds_go_in_batches_that_never_add_to_one_tensor_twice_in_their_order():
    """A CUDA ``_foreach_add_`` given one target twice loses one of the adds: a step's deferred
    sums are split so each batch names a target once, and each target gets its adds in order."""
    a, b = torch.zeros(3), torch.zeros(3)
    adds = [(a, torch.full((3,), 1.0)), (b, torch.full((3,), 5.0)), (a, torch.full((3,), 2.0)),
            (a, torch.full((3,), 4.0))]
    batches = _distinct_totals(adds)
    assert [[(total is a, float(addend[0])) for total, addend in batch] for batch in batches] == \
        [[(True, 1.0), (False, 5.0)], [(True, 2.0)], [(True, 4.0)]]
    for batch in batches:
        assert len({id(total) for total, _ in batch}) == len(batch)
        torch._foreach_add_([t for t, _ in batch], [x for _, x in batch])
    assert torch.equal(a, torch.full((3,), 7.0)) and torch.equal(b, torch.full((3,), 5.0))
    assert _distinct_totals([]) == []


def test_a_pulls_rounding_is_encoded_once_per_version():
    flat = torch.randn(700)
    state = BlockState(block=None, flat=flat, params=[flat[:300], flat[300:]], first_param=0, nbytes=[1200, 1600],
                       clocks=[0])
    int8 = Int8(block=100)
    first = state.encoded(1, int8)
    assert state.encoded(1, int8) is first  # every worker's pull of this version sends the one payload
    assert torch.equal(first, int8.encode(flat[300:]))
    assert state.encoded(0, int8) is not first and state.encoded(1, BF16()) is not first
    flat.add_(1.0)
    state.version += 1  # an update
    again = state.encoded(1, int8)
    assert again is not first and torch.equal(again, int8.encode(flat[300:]))
    flat.mul_(2.0)
    state.forget_staged()  # values written outside an update: init, restore
    assert torch.equal(state.encoded(1, int8), int8.encode(flat[300:]))
