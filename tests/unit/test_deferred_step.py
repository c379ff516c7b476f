"""``DistributedOptimizer`` without overlap leaves a device-ordered step to complete on the GPU
and takes its answers in later (``_unfinished``): a rollback found then must drop exactly one
step and pull the restored values, whichever of ``step_count``, ``step()`` or ``close()`` finds it.
Stand-ins for the worker and the step's future: no cluster, no GPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from psframework.errors import RolledBackError
from psframework.training import DistributedOptimizer, overlap_by_default
from psframework.worker.plans import PackedBlock


class _Future:
    def __init__(self, error=None):
        self.error, self.waited = error, 0
        self.ordered_on_device = True

    def wait(self, timeout=None):
        self.waited += 1
        if self.error is not None:
            raise self.error


class _Client:
    rollback = 0


class _Worker:
    def __init__(self):
        self.rank, self.steps, self.pulls, self.push_pulls, self.closed = 0, 7, 0, 0, False
        self.client = _Client()

    def pull(self, params):
        self.pulls += 1
        return _Future()

    def push_pull(self, grads, into, device_ordered=False):
        self.push_pulls += 1
        return _Future()

    def close(self):
        self.closed = True


def _optimizer(unfinished) -> DistributedOptimizer:
    opt = object.__new__(DistributedOptimizer)  # the state __init__ leaves, without registering
    opt.worker, opt._owns_worker = _Worker(), False
    opt.params = {"w": torch.zeros(2, requires_grad=True)}
    opt._tables, opt._overlap, opt._rolled_back, opt._unfinished = None, None, None, unfinished
    opt._shared, opt._given_up = None, []  # no parameters in mapped memory (``_shared``: see _Mapped)
    opt._moved_mid_step = set()
    opt.checkpoint_dir, opt.checkpoint_every, opt.start_step = None, None, 0
    return opt


def test_a_rollback_found_by_step_count_drops_the_next_step_and_pulls_the_restored_values():
    unfinished = _Future(RolledBackError("went back", step=4))
    opt = _optimizer(unfinished)
    assert opt.step_count == 7
    assert unfinished.waited == 1 and opt._unfinished is None
    assert opt._rolled_back == 4
    opt.step()  # its gradients belong to the model before the rollback
    assert opt.worker.push_pulls == 0 and opt.worker.pulls == 1
    assert opt._rolled_back is None
    opt.step()  # the next one is a step again, left to complete on the GPU
    assert opt.worker.push_pulls == 1 and opt._unfinished is not None


def test_a_rollback_found_by_step_drops_that_step_only():
    opt = _optimizer(_Future(RolledBackError("went back", step=4)))
    opt.step()
    assert opt.worker.push_pulls == 0 and opt.worker.pulls == 1 and opt._rolled_back is None
    opt.step()
    assert opt.worker.push_pulls == 1


def test_close_takes_the_last_step_in_and_a_rollback_there_is_no_error():
    unfinished = _Future(RolledBackError("went back", step=4))
    opt = _optimizer(unfinished)
    opt.close()
    assert unfinished.waited == 1 and opt._unfinished is None


def test_a_finished_step_is_waited_for_once():
    unfinished = _Future()
    opt = _optimizer(unfinished)
    assert opt.step_count == 7 and opt.step_count == 7
    assert unfinished.waited == 1 and opt._rolled_back is None


class _Mapped:
    """A stand-in for ``_MappedParams``: counts renews and completions."""

    def __init__(self, renews: bool = True):
        self.renewed, self.completions, self.closed, self._renews = 0, 0, False, renews

    def renew(self):
        self.renewed += 1
        return self._renews

    def completed(self):
        self.completions += 1

    def stage(self, grads):
        return {}

    def packed(self, staged):
        return {}

    def close(self):
        self.closed = True


def _mapped(unfinished, renews: bool = True) -> tuple[DistributedOptimizer, _Mapped]:
    opt = _optimizer(unfinished)
    opt._shared = _Mapped(renews)
    return opt, opt._shared


def test_a_failed_step_found_by_step_count_moves_the_parameters_before_raising():
    """Late answers to a step left to the GPU may still write the parameters where they lie:
    whichever call takes its failure in (``step_count`` here), they move first."""
    opt, mapped = _mapped(_Future(RuntimeError("server 0 died")))
    try:
        opt.step_count
    except RuntimeError:
        pass
    else:
        raise AssertionError("the step's error was not raised")
    assert mapped.renewed == 1 and mapped.completions == 0


def test_a_rollback_found_by_step_count_moves_the_parameters_before_the_restored_values_are_pulled():
    opt, mapped = _mapped(_Future(RolledBackError("went back", step=4)))
    assert opt.step_count == 7
    opt.step()
    assert mapped.renewed == 1 and opt.worker.pulls == 1


def test_a_step_completed_on_the_gpu_and_taken_in_by_step_count_lets_the_old_buffers_go():
    opt, mapped = _mapped(_Future())
    assert opt.step_count == 7
    assert mapped.completions == 1 and mapped.renewed == 0


def test_a_failed_checkpoint_after_a_completed_step_moves_nothing(tmp_path):
    opt, mapped = _mapped(None)
    opt._unfinished = None
    opt.checkpoint_dir, opt.checkpoint_every = str(tmp_path), 1

    def fail(directory, step):
        raise OSError("disk full")
    opt.worker.save_checkpoint = fail
    opt.worker.push_pull = lambda grads, into, device_ordered=False: _Future()
    try:
        opt.step()
    except OSError:
        pass
    else:
        raise AssertionError("the checkpoint's error was not raised")
    assert mapped.renewed == 0


def test_when_the_parameters_cannot_move_their_buffers_are_kept_for_the_job():
    opt, mapped = _mapped(_Future(RuntimeError("server 0 died")), renews=False)
    try:
        opt.step()
    except RuntimeError:
        pass
    assert opt._shared is None and mapped.closed and opt._given_up == [mapped]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("server_maps_gpu_memory", [True, False])
def test_gpu_buffers_no_server_uses_are_kept_for_the_next_renew_where_servers_map_gpu_memory(server_maps_gpu_memory):
    """An exported GPU allocation must not be freed while a server may still map it: where a
    server maps our GPU memory, buffers of failed steps wait for the next ``renew`` instead of
    going back to torch's allocator. Laid out for the lanes only, they go back to it."""
    from psframework.training import _MappedBuffers
    from psframework.worker.direct import DirectExchange

    direct = DirectExchange(rank=0, on_gpu=True)
    direct.answered(0, on_device=True, accepted=server_maps_gpu_memory)
    buffers = _MappedBuffers(direct)
    device = torch.device("cuda", torch.cuda.current_device())
    first = buffers(1000, torch.float32, device)
    buffers.take_back([first])
    assert (buffers(1000, torch.float32, device) is first) == server_maps_gpu_memory
    assert buffers(1000, torch.float32, device) is not first


def _mapped_params():
    """A real ``_MappedParams`` of a small model in shared host memory (no cluster)."""
    from psframework.sharding import TensorSpec, assign_shards
    from psframework.training import _MappedBuffers, _MappedParams
    from psframework.worker.direct import DirectExchange
    from psframework.worker.flat import FlatViews

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    params = dict(model.named_parameters())
    specs = [TensorSpec(name, tuple(p.shape), "float32") for name, p in params.items()]
    direct = DirectExchange(rank=0)
    buffers = _MappedBuffers(direct)
    shard_map = assign_shards(specs, 1, 1 << 20)
    views = FlatViews(params, shard_map.blocks, buffers, whole=True, host_in_place=True)
    worker = SimpleNamespace(rank=0, lanes=SimpleNamespace(direct=direct), shard_map=shard_map)
    model(torch.randn(3, 8)).sum().backward()
    return _MappedParams(worker, views, set(params), buffers), params, direct


def _in_shared_memory(direct, tensor: torch.Tensor) -> bool:
    try:
        direct.host_memory.allocation_of(tensor.data_ptr())
        return True
    except Exception:
        return False


def test_host_buffers_of_a_failed_step_are_let_go_at_once():
    """A late answer writes host buffers that only the server still maps once the worker let them
    go: nothing of the worker's lies there, so they need not wait for a completed step."""
    mapped, params, direct = _mapped_params()
    try:
        old = mapped.views.buffers
        values = {name: p.detach().clone() for name, p in params.items()}
        assert mapped.renew()
        assert direct.host_memory.freed == len(old)
        assert not any(_in_shared_memory(direct, buffer) for buffer in old)
        assert all(_in_shared_memory(direct, p) and torch.equal(p, values[name]) for name, p in params.items())
    finally:
        direct.close()


def test_host_parameters_move_after_every_failed_step_in_a_row():
    """Host buffers of failed steps are let go at once: however many steps fail in a row, the
    parameters keep moving to new mapped memory and stay there."""
    mapped, params, direct = _mapped_params()
    try:
        for _ in range(5):
            assert mapped.renew()
        assert direct.write_values and all(_in_shared_memory(direct, p) for p in params.values())
    finally:
        direct.close()


class _GpuLikeViews:
    """``FlatViews`` as ``_MappedParams.renew`` sees it, with buffers that say they are on a GPU."""

    names, params, in_place = [], {}, set()

    def __init__(self):
        self.buffers = [SimpleNamespace(is_cuda=True)]

    def renew(self):
        old, self.buffers = self.buffers, [SimpleNamespace(is_cuda=True)]
        return old


class _Buffers:
    def __init__(self):
        self.taken_back = []

    def take_back(self, buffers):
        self.taken_back += buffers


def test_after_gpu_buffers_moved_twice_in_a_row_a_failed_step_leaves_the_mapped_memory():
    """A GPU's buffers of failed steps stay allocated until a step completes; so that steps failing
    in a row do not take ever more GPU memory, after ``MAX_RENEWS_IN_A_ROW`` moves the next failed
    step makes the parameters ordinary tensors (through the lanes from then on)."""
    from psframework.training import MAX_RENEWS_IN_A_ROW, _MappedParams
    from psframework.worker.direct import DirectExchange
    direct = DirectExchange(rank=0)
    buffers = _Buffers()
    mapped = _MappedParams(SimpleNamespace(rank=0, lanes=SimpleNamespace(direct=direct)), _GpuLikeViews(), set(),
                           buffers)
    try:
        for _ in range(MAX_RENEWS_IN_A_ROW):
            assert mapped.renew()
        mapped.completed()  # a step in between starts the count again, and lets the old buffers go
        assert len(buffers.taken_back) == MAX_RENEWS_IN_A_ROW
        for _ in range(MAX_RENEWS_IN_A_ROW):
            assert mapped.renew()
        assert direct.write_values and not mapped.renew() and not direct.write_values
    finally:
        direct.close()


def _laid_out(device_lane_servers: set[int], flags: bool = True, compressed: bool = False):
    """A worker whose two tensors lie in blocks of servers 0 and 1, with device lanes to some."""
    blocks = {"a": [(SimpleNamespace(server=0), None)], "b": [(SimpleNamespace(server=1), None)]}
    return SimpleNamespace(rank=0, shard_map=SimpleNamespace(segments_of=blocks.__getitem__),
                           lanes=SimpleNamespace(device_lanes=dict.fromkeys(device_lane_servers),
                                                 flag_watch=object() if flags else None),
                           compression=SimpleNamespace(keeps_off_lane=lambda op, names: compressed))


def test_overlap_is_on_by_default_unless_each_step_of_a_gpu_model_would_be_ordered_on_the_gpu():
    """Off only where a step without overlap is left to complete on the GPU: every block of a
    model on one GPU through a device lane with flags, nothing compressed off the lanes, no
    tables, no ``checkpoint_every``; anywhere else a step waits on the host, and overlap hides it."""
    gpu = torch.device("cuda", 0)
    on_gpu = {name: SimpleNamespace(device=gpu) for name in "ab"}
    assert not overlap_by_default(_laid_out({0, 1}), on_gpu)
    assert overlap_by_default(_laid_out({0}), on_gpu)  # server 1 has no device lane
    assert overlap_by_default(_laid_out({0, 1}), {"a": on_gpu["a"], "b": torch.zeros(1)})  # a host tensor
    assert overlap_by_default(_laid_out({0, 1}), {"a": torch.zeros(1), "b": torch.zeros(1)})
    other_gpu = SimpleNamespace(device=torch.device("cuda", 1))
    assert overlap_by_default(_laid_out({0, 1}), {"a": on_gpu["a"], "b": other_gpu})  # lanes of one GPU only
    assert overlap_by_default(_laid_out({0, 1}, flags=False), on_gpu)  # no flags: steps wait on the host
    assert overlap_by_default(_laid_out({0, 1}, compressed=True), on_gpu)
    assert overlap_by_default(_laid_out({0, 1}), on_gpu, tables=True)
    assert overlap_by_default(_laid_out({0, 1}), on_gpu, checkpoint_every=10)


def test_a_gradient_that_could_not_be_staged_does_not_count_as_handed_over():
    """With overlap a hook copies its gradient where the servers read it before handing it over;
    if that raises, the gradient must not count as handed over, or ``step()`` would wait for
    ever for a block that never gets it."""
    from psframework.training import _Overlap
    model = torch.nn.Linear(2, 1)
    params = dict(model.named_parameters())

    def grads_of(names):
        if "bias" in names:
            raise RuntimeError("no memory to stage the gradient")
        return {name: params[name].grad for name in names}

    overlap = _Overlap(SimpleNamespace(rank=0, client=SimpleNamespace(rollback=0)), params, grads_of)
    try:
        with pytest.raises(RuntimeError, match="no memory to stage"):
            model(torch.ones(1, 2)).sum().backward()
        assert "bias" not in overlap._handed
    finally:
        overlap.close()


def test_a_packed_block_that_could_not_be_staged_does_not_count_as_handed_over():
    """The same for a packed block under overlap (``_Packing``): its last tensor's hook stages the
    whole block; if that raises, none of the block's tensors counts as handed over."""
    from psframework.training import _Overlap, _Packing
    model = torch.nn.Linear(2, 1)
    params = dict(model.named_parameters())
    shared = SimpleNamespace(views=SimpleNamespace(regions={7: PackedBlock(frozenset(params), torch.zeros(3),
                                                                           torch.zeros(3))}))

    def staged_of(names):
        raise RuntimeError("no memory to stage the gradients")

    packing = _Packing(lambda: shared, staged_of)
    assert packing.block_of == {"weight": 7, "bias": 7}
    overlap = _Overlap(SimpleNamespace(rank=0, client=SimpleNamespace(rollback=0)), params,
                       lambda names: {name: params[name].grad for name in names}, packing)
    try:
        with pytest.raises(RuntimeError, match="no memory to stage"):
            model(torch.ones(1, 2)).sum().backward()
        assert not overlap._handed
    finally:
        overlap.close()


def _staged(mapped, params) -> dict:
    """What ``DistributedOptimizer._grads`` would push for each parameter (None: no gradient)."""
    grads = {name: p.grad for name, p in params.items()}
    grads.update(mapped.stage(grads))
    return grads


def test_host_gradients_in_place_count_as_torch_counts_them_across_renew_and_zero_grad():
    """A host gradient in place counts as given once backward reached it or the caller assigned
    one, and as none where torch's would be None: after ``renew`` (a failed step), after
    ``zero_grad(set_to_none=False)`` and after the caller's own ``model.zero_grad()``."""
    mapped, params, direct = _mapped_params()
    try:
        first, second, third = list(params)[:3]
        mapped.zero_grad(set_to_none=True)
        params[first].grad = torch.full_like(params[first], 2.0)  # assigned by hand, never reached
        assert mapped.renew()
        grads = _staged(mapped, params)
        assert grads[first] is not None and float(grads[first].flatten()[0]) == 2.0  # not lost in the move
        assert grads[second] is None
        mapped.zero_grad(set_to_none=False)  # torch: the gradient it had stays, zeroed
        grads = _staged(mapped, params)
        assert grads[first] is not None and float(grads[first].abs().sum()) == 0 and grads[second] is None
        mapped._reached.add(third)  # backward reached it, then the caller's model.zero_grad() dropped it
        params[third].grad = None
        mapped.zero_grad(set_to_none=False)
        assert _staged(mapped, params)[third] is None
    finally:
        direct.close()


def test_a_host_gradient_not_reached_counts_as_none_after_its_parameter_left_its_view():
    mapped, params, direct = _mapped_params()
    try:
        name = next(iter(params))
        mapped.zero_grad(set_to_none=True)
        params[name].data = params[name].data.clone()
        assert _staged(mapped, params)[name] is None
    finally:
        direct.close()


def test_with_no_memory_to_move_unreached_host_gradients_become_none_not_zeros(monkeypatch):
    """The parameters leave the mapped memory: a gradient in place that counts as none becomes
    None (torch's), one that counts as given a tensor of its own with its values."""
    mapped, params, direct = _mapped_params()
    try:
        first, second = list(params)[:2]
        mapped.zero_grad(set_to_none=True)
        mapped._reached.add(first)
        params[first].grad.fill_(3.0)
        monkeypatch.setattr(mapped.views, "renew", lambda: (_ for _ in ()).throw(OSError("no memory left")))
        assert not mapped.renew()
        assert params[second].grad is None
        assert not _in_shared_memory(direct, params[first].grad) and float(params[first].grad.min()) == 3.0
    finally:
        direct.close()


def test_parameters_that_cannot_move_for_any_reason_leave_the_mapped_memory(monkeypatch):
    """Whatever stops the move after a failed step (here a copy that raises), the parameters must
    not stay where a late answer may write them: they become ordinary tensors with their values."""
    mapped, params, direct = _mapped_params()
    try:
        values = {name: p.detach().clone() for name, p in params.items()}
        monkeypatch.setattr(mapped.views, "renew", lambda: (_ for _ in ()).throw(RuntimeError("copy failed")))
        assert not mapped.renew()
        assert not direct.write_values
        assert all(not _in_shared_memory(direct, p) and torch.equal(p, values[name]) for name, p in params.items())
    finally:
        direct.close()
