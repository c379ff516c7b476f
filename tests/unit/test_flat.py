"""A model's small tensors and gradients as views of flat buffers laid out like the servers' blocks
(``worker/flat.py``): every packed block becomes one region, values and training unchanged."""

from __future__ import annotations

import copy

import pytest
import torch

from psframework.sharding import TensorSpec, assign_shards
from psframework.worker.flat import FlatViews, flat_layout

CPU32 = (torch.device("cpu"), torch.float32)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 4), torch.nn.Embedding(200, 8))


def _blocks(params: dict, chunk_bytes: int = 1024, servers: int = 2):
    specs = [TensorSpec(name, tuple(p.shape), "float32") for name, p in params.items()]
    return assign_shards(specs, servers, chunk_bytes).blocks


def test_every_packed_block_is_one_region_and_a_large_tensors_pieces_stay_out():
    params = dict(_model().named_parameters())
    blocks = _blocks(params)
    [(place, (size, offsets))] = flat_layout(blocks, {n: CPU32 for n in params}).items()
    assert place == CPU32
    packed = [block for block in blocks if len(block.segments) > 1]
    assert packed and "5.weight" not in offsets  # the embedding (6.4 KB) is cut into blocks of its own
    regions = []
    for block in packed:
        starts = {offsets[seg.key] - seg.block_offset for seg in block.segments}
        assert len(starts) == 1  # the block's tensors lie one after another, in its order
        regions.append((starts.pop(), block.numel))
    regions.sort()
    assert all(a + n <= b for (a, n), (b, _) in zip(regions, regions[1:]))
    assert size == sum(n for _, n in regions)


def test_blocks_with_a_tensor_not_asked_for_stay_out():
    params = dict(_model().named_parameters())
    blocks = _blocks(params)
    some = {n: CPU32 for n in list(params)[:2]}
    layout = flat_layout(blocks, some)
    laid_out = set(layout[CPU32][1]) if layout else set()
    for block in blocks:
        keys = {seg.key for seg in block.segments}
        assert (keys <= laid_out) == (len(block.segments) > 1 and keys <= set(some))


def test_views_keep_the_values_and_backward_accumulates_into_the_flat_gradients():
    model, plain = _model(), _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params))
    assert views.names
    for (name, p), q in zip(params.items(), plain.parameters()):
        assert torch.equal(p, q)
    [grads] = views.grad_buffers
    pointers = {name: params[name].grad.data_ptr() for name in views.names}
    x = torch.randn(5, 8)
    for net in (model, plain):
        net[:5](x).square().sum().backward()
        net[5](torch.tensor([1, 2, 3])).sum().backward()
    for (name, p), q in zip(params.items(), plain.parameters()):
        assert torch.equal(p.grad, q.grad), name
    assert all(params[name].grad.data_ptr() == pointer for name, pointer in pointers.items())
    assert all(views.intact(name) for name in views.names)
    assert float(grads.abs().sum()) > 0
    views.zero_grad()
    assert float(grads.abs().sum()) == 0 and all(views.intact(name) for name in views.names)


def test_a_gradient_set_to_none_elsewhere_gets_its_view_back_with_what_it_holds():
    model = _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params))
    name = views.names[0]
    model.zero_grad(set_to_none=True)
    assert not views.intact(name)
    params[name].grad = torch.ones_like(params[name])
    views.restore()
    assert views.intact(name) and torch.equal(params[name].grad, torch.ones_like(params[name]))


def test_an_optimizer_steps_the_views_like_the_plain_tensors():
    model = _model()
    plain = copy.deepcopy(model)
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params))
    opts = [torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) for net in (model, plain)]
    x = torch.randn(5, 8)
    for _ in range(3):
        for net, opt in zip((model, plain), opts):
            net[:5](x).square().sum().backward()
            opt.step()
        views.zero_grad()  # the views' gradients; the others are the caller's
        for name, param in params.items():
            if name not in views.names:
                param.grad = None
        plain.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert all(views.intact(name) for name in views.names)


def test_gradients_only_in_buffers_of_their_own_and_renewed_with_what_they_hold():
    """``values=False, whole=True``: the parameters stay where they are; every gradient is a view
    (a large tensor's of a buffer of its own); ``renew`` moves them to new buffers with their
    values, and the old buffers, which it returns, keep what they held."""
    model = _model()
    params = dict(model.named_parameters())
    pointers = {name: p.data_ptr() for name, p in params.items()}
    made = []

    def allocate(numel, dtype, device):
        made.append(torch.full((numel,), float("nan"), dtype=dtype, device=device))
        return made[-1]

    views = FlatViews(params, _blocks(params), allocate, whole=True, values=False)
    assert sorted(views.names) == sorted(params)
    assert all(p.data_ptr() == pointers[name] for name, p in params.items())
    assert len(made) == len(views.grad_buffers)  # gradients only
    model[:5](torch.randn(5, 8)).square().sum().backward()
    model[5](torch.tensor([1, 2])).sum().backward()
    before = {name: p.grad.clone() for name, p in params.items()}
    old = views.grad_buffers
    assert [b.data_ptr() for b in views.renew()] == [b.data_ptr() for b in old]
    assert all(views.intact(name) for name in views.names)
    assert all(torch.equal(p.grad, before[name]) for name, p in params.items())
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(old, views.grad_buffers))
    views.zero_grad()
    assert all(float(buffer.abs().sum()) > 0 for buffer in old if buffer.numel() > 1)  # left as they were


def test_zero_grad_drops_a_gradient_that_replaced_the_view():
    """``model.zero_grad()`` (set_to_none) and a backward leave ``p.grad`` a tensor of torch's; the
    next ``zero_grad`` of the views gives the view back zeroed, not holding that gradient."""
    model = _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params), whole=True, values=False)
    model.zero_grad()  # set_to_none
    model[:5](torch.randn(5, 8)).square().sum().backward()
    assert not views.intact("0.weight")
    views.zero_grad()
    assert all(views.intact(name) for name in views.names)
    assert all(float(p.grad.abs().sum()) == 0 for p in params.values())


def test_values_and_gradients_renewed_together_and_a_failed_allocation_leaves_both_as_they_were():
    """``whole=True`` with values: ``renew`` moves every parameter and its gradient to new buffers
    with what they hold (the model computes the same), and returns the old ones, which a late
    writer may still write without touching the parameters; an allocation that fails half-way
    leaves every view where it was."""
    model = _model()
    params = dict(model.named_parameters())
    fail = []

    def allocate(numel, dtype, device):
        if fail:
            raise OSError("no memory left")
        return torch.empty(numel, dtype=dtype, device=device)

    views = FlatViews(params, _blocks(params), allocate, whole=True)
    x = torch.randn(5, 8)
    model[:5](x).square().sum().backward()
    values = {name: p.detach().clone() for name, p in params.items()}
    grads = {name: p.grad.clone() for name, p in params.items()}
    pointers = {name: (p.data_ptr(), p.grad.data_ptr()) for name, p in params.items()}
    fail.append(True)
    with pytest.raises(OSError):
        views.renew()
    assert {name: (p.data_ptr(), p.grad.data_ptr()) for name, p in params.items()} == pointers
    fail.clear()
    old = views.renew()
    assert all(views.intact(name) for name in views.names)
    for name, p in params.items():
        assert torch.equal(p, values[name]) and torch.equal(p.grad, grads[name]), name
        assert p.data_ptr() != pointers[name][0] and p.grad.data_ptr() != pointers[name][1], name
    for buffer in old:
        buffer.fill_(7.0)  # a late write into the old buffers
    assert all(torch.equal(p, values[name]) and torch.equal(p.grad, grads[name]) for name, p in params.items())
