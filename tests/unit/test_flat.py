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


def _views_of(views: FlatViews, params: dict) -> bool:
    """Whether every laid-out parameter is still a view of the values' buffers."""
    return all(any(b.data_ptr() <= params[name].data_ptr() < b.data_ptr() + b.numel() * b.element_size()
                   for b in views.buffers[:len(views.grad_buffers)]) for name in views.names)


def test_views_keep_the_values_and_stage_copies_the_gradients_into_the_flat_buffer():
    model, plain = _model(), _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params))
    assert views.names and _views_of(views, params)
    for (name, p), q in zip(params.items(), plain.parameters()):
        assert torch.equal(p, q)
    [grads] = views.grad_buffers
    grads.fill_(float("nan"))
    x = torch.randn(5, 8)
    for net in (model, plain):
        net[:5](x).square().sum().backward()
    given = {name: p.grad for name, p in params.items()}
    given[views.names[0]] = None  # as if backward had not reached it
    staged = views.stage(given)
    assert set(staged) == set(views.names)
    for name in views.names:
        if given[name] is None:  # no gradient: none staged, and nothing copied there
            assert staged[name] is None and torch.isnan(views.grad_view(name)).all()
        else:
            assert staged[name].data_ptr() == views.grad_view(name).data_ptr()
            assert torch.equal(staged[name], given[name]), name
    for (name, p), q in zip(params.items(), plain.parameters()):
        assert p.grad is None or torch.equal(p.grad, q.grad), name  # torch's own, untouched


def test_a_sparse_gradient_is_staged_dense_and_names_not_laid_out_are_left_out():
    model = _model()
    model[5] = torch.nn.Embedding(200, 8, sparse=True)
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params), whole=True, values=False)
    model[5](torch.tensor([1, 2, 2])).sum().backward()
    grad = params["5.weight"].grad
    assert grad.is_sparse
    staged = views.stage({"5.weight": grad, "not a parameter": torch.ones(1)})
    assert list(staged) == ["5.weight"] and torch.equal(staged["5.weight"], grad.to_dense())


def test_a_gradient_unlike_its_view_is_left_out_and_one_made_with_create_graph_is_copied_alone():
    params = dict(_model().named_parameters())
    views = FlatViews(params, _blocks(params))
    first, second, third = views.names[:3]
    made = params[third].detach().clone().requires_grad_()
    with_graph = (made * 2).detach().requires_grad_() * 1  # requires grad, as a create_graph gradient does
    grads = {first: torch.ones(params[first].numel() + 1), second: torch.ones_like(params[second], dtype=torch.float64),
             third: with_graph}
    staged = views.stage(grads)
    assert set(staged) == {third}  # the caller pushes the others as they are, and its checks say what is wrong
    assert torch.equal(views.grad_view(third), with_graph.detach())
    assert not views.grad_view(third).requires_grad and views.grad_view(third).grad_fn is None


def test_stage_copies_every_gradient_of_a_device_and_dtype_in_one_fused_copy(monkeypatch):
    params = dict(_model().named_parameters())
    views = FlatViews(params, _blocks(params), whole=True)  # tensors outside packed blocks: buffers of their own
    assert len(views.grad_buffers) > 2
    calls = []
    copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda into, sources: calls.append(len(into)) or copy(into, sources))
    grads = {name: torch.randn_like(p) for name, p in params.items()}
    staged = views.stage(grads)
    assert calls == [len(params)]
    assert all(torch.equal(staged[name], grad) for name, grad in grads.items())


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
            net.zero_grad()
    for p, q in zip(model.parameters(), plain.parameters()):
        assert torch.equal(p, q)
    assert _views_of(views, params)


def test_gradients_only_in_buffers_of_their_own_and_renewed_with_what_was_staged_left_behind():
    """``values=False, whole=True``: the parameters stay where they are; every parameter has a
    gradient view (a large tensor's in a buffer of its own); ``renew`` moves the views to new
    buffers, and the old buffers, which it returns, keep what was staged in them."""
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
    views.stage({name: p.grad for name, p in params.items()})
    old = views.grad_buffers
    assert [b.data_ptr() for b in views.renew()] == [b.data_ptr() for b in old]
    assert not any(a.data_ptr() == b.data_ptr() for a, b in zip(old, views.grad_buffers))
    assert all(not torch.isnan(buffer).any() for buffer in old)  # left as they were: every gradient staged


def test_values_and_gradients_renewed_together_and_a_failed_allocation_leaves_both_as_they_were():
    """``whole=True`` with values: ``renew`` moves every parameter to new buffers with what it
    holds (the model computes the same) and the gradient views to new buffers, and returns the old
    ones, which a late writer may still write without touching the parameters; an allocation that
    fails half-way leaves every view where it was."""
    model = _model()
    params = dict(model.named_parameters())
    fail = []

    def allocate(numel, dtype, device):
        if fail:
            raise OSError("no memory left")
        return torch.empty(numel, dtype=dtype, device=device)

    views = FlatViews(params, _blocks(params), allocate, whole=True)
    values = {name: p.detach().clone() for name, p in params.items()}
    pointers = {name: (p.data_ptr(), views.grad_view(name).data_ptr()) for name, p in params.items()}
    fail.append(True)
    with pytest.raises(OSError):
        views.renew()
    assert {name: (p.data_ptr(), views.grad_view(name).data_ptr()) for name, p in params.items()} == pointers
    fail.clear()
    old = views.renew()
    for name, p in params.items():
        assert torch.equal(p, values[name]), name
        assert p.data_ptr() != pointers[name][0] and views.grad_view(name).data_ptr() != pointers[name][1], name
    for buffer in old:
        buffer.fill_(7.0)  # a late write into the old buffers
    assert all(torch.equal(p, values[name]) for name, p in params.items())


def test_gradients_that_do_not_fit_their_view_and_parameters_moved_elsewhere_are_not_staged():
    """A gradient of another dtype or shape than its parameter's view, or a parameter whose
    ``.data`` the caller replaced, is left out (pushed as it is, where the checks say what is
    wrong) instead of cast or broadcast into the buffer the servers read."""
    model = _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params), whole=True)
    model[:5](torch.randn(5, 8)).square().sum().backward()
    grads = {name: p.grad for name, p in params.items() if p.grad is not None}
    wrong_dtype, wrong_shape, moved, fine = list(grads)[:4]
    grads[wrong_dtype] = grads[wrong_dtype].double()
    grads[wrong_shape] = grads[wrong_shape].reshape(-1)[:1]
    params[moved].data = params[moved].data.clone()
    staged = views.stage(grads)
    assert not {wrong_dtype, wrong_shape, moved} & set(staged)
    assert torch.equal(staged[fine], grads[fine])


def test_host_gradients_in_place_are_their_views_accumulated_by_backward():
    """``host_in_place``: each host gradient is its view, which backward accumulates into (torch's
    numbers) and ``stage`` leaves where it is; a gradient that replaced the view is copied into it,
    and ``zero_grad`` gives the views back, zeroed."""
    model, plain = _model(), _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params), whole=True, host_in_place=True)
    assert views.in_place == set(params) and all(views.grad_is_view(name) for name in params)
    x = torch.randn(5, 8)
    for net in (model, plain):
        net[:5](x).square().sum().backward()
    for (name, p), q in zip(params.items(), plain.parameters()):
        assert views.grad_is_view(name) and (q.grad is None or torch.equal(p.grad, q.grad)), name
    staged = views.stage({name: p.grad for name, p in params.items()})
    assert all(staged[name].data_ptr() == p.grad.data_ptr() for name, p in params.items())
    model.zero_grad()  # set_to_none: torch's own gradients next
    model[:5](x).square().sum().backward()
    replaced = next(name for name, p in params.items() if p.grad is not None)
    assert not views.grad_is_view(replaced)
    assert torch.equal(views.stage({replaced: params[replaced].grad})[replaced], params[replaced].grad)
    views.zero_grad()
    assert all(views.grad_is_view(name) and float(p.grad.abs().sum()) == 0 for name, p in params.items())


def test_gradients_in_place_move_with_what_they_hold_when_renewed():
    model = _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params), whole=True, host_in_place=True)
    model[:5](torch.randn(5, 8)).square().sum().backward()
    before = {name: p.grad.clone() for name, p in params.items()}
    pointers = {name: p.grad.data_ptr() for name, p in params.items()}
    old = views.renew()
    for name, p in params.items():
        assert views.grad_is_view(name) and p.grad.data_ptr() != pointers[name], name
        assert torch.equal(p.grad, before[name]), name
    for buffer in old:
        buffer.fill_(7.0)  # a late write into the old buffers
    assert all(torch.equal(p.grad, before[name]) for name, p in params.items())


def test_a_block_whose_every_gradient_was_staged_is_one_region_of_gradients_and_of_values():
    model = _model()
    params = dict(model.named_parameters())
    blocks = _blocks(params)
    views = FlatViews(params, blocks)
    model[:5](torch.randn(3, 8)).sum().backward()
    packed = views.packed(views.stage({name: p.grad for name, p in params.items()}))
    several = {block.block_id: block for block in blocks if len(block.segments) > 1}
    assert several and set(packed) <= set(several)
    for block_id, region in packed.items():
        block = several[block_id]
        assert region.names == {seg.key for seg in block.segments}
        assert region.grads.numel() == region.values.numel() == block.numel
        for seg in block.segments:  # the region holds the block as its server does
            piece = slice(seg.block_offset, seg.block_offset + seg.numel)
            assert torch.equal(region.grads[piece], params[seg.key].grad.reshape(-1))
            assert torch.equal(region.values[piece], params[seg.key].detach().reshape(-1))
            assert region.values[piece].data_ptr() == params[seg.key].data_ptr()
    assert set(packed) == set(several)  # every block of the layout fills its region with no gap here
    first = next(iter(packed.values()))
    name = sorted(first.names)[0]
    grads = {n: p.grad for n, p in params.items()}
    left_out = [block_id for block_id, region in packed.items() if name in region.names]
    # a gradient that is None, or a parameter moved off its view, leaves its block out
    assert not set(left_out) & set(views.packed(views.stage({**grads, name: None})))
    params[name].data = params[name].data.clone()
    assert not set(left_out) & set(views.packed(views.stage(grads)))
    assert set(views.packed(views.stage(grads))) == set(packed) - set(left_out)


def test_packed_regions_follow_the_buffers_when_they_are_renewed():
    model = _model()
    params = dict(model.named_parameters())
    views = FlatViews(params, _blocks(params))
    model[:5](torch.randn(3, 8)).sum().backward()
    grads = {name: p.grad for name, p in params.items()}
    before = views.packed(views.stage(grads))
    views.renew()
    after = views.packed(views.stage(grads))
    assert set(after) == set(before)
    for block_id, region in after.items():
        for tensor, old in ((region.grads, before[block_id].grads), (region.values, before[block_id].values)):
            assert tensor.data_ptr() != old.data_ptr()
            assert any(b.data_ptr() <= tensor.data_ptr() < b.data_ptr() + b.numel() * 4 for b in views.buffers)
