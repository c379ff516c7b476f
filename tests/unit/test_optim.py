from __future__ import annotations

import math

import msgpack
import pytest
import torch

from psframework import optim
from psframework.errors import BadRequestError, ConfigError

SPECS = {
    "sgd-plain": optim.SGD(lr=0.1),
    "sgd-momentum": optim.SGD(lr=0.05, momentum=0.9),
    "sgd-nesterov": optim.SGD(lr=0.05, momentum=0.9, nesterov=True),
    "sgd-weight-decay": optim.SGD(lr=0.1, weight_decay=0.01),
    "sgd-dampening": optim.SGD(lr=0.1, momentum=0.8, dampening=0.3, weight_decay=0.02),
    "adam": optim.Adam(lr=0.01),
    "adam-weight-decay": optim.Adam(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "adagrad": optim.Adagrad(lr=0.1, eps=1e-8),
}
SHAPES = [(), (1,), (4, 3), (7,), (2, 5)]
SPLIT = [5, 16, 10]  # 31 elements in all, cut across tensor boundaries
STEPS = 5


def model_params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def to_blocks(tensors: list[torch.Tensor], device: str = "cpu") -> list[torch.Tensor]:
    flat = torch.cat([t.reshape(-1) for t in tensors])
    assert flat.numel() == sum(SPLIT)
    return [b.clone().to(device) for b in flat.split(SPLIT)]


def random_grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(s, generator=g) for s in SHAPES]


def all_grads(grads: list[torch.Tensor], device: str = "cpu") -> dict[int, torch.Tensor]:
    return dict(enumerate(to_blocks(grads, device)))


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_matches_torch_optim_step_by_step(spec: optim.OptimizerSpec) -> None:
    reference = [p.clone().requires_grad_() for p in model_params()]
    ref_opt = spec.torch_class(reference, **spec.hyperparameters())
    shard = optim.ShardOptimizer(spec, to_blocks(model_params()))
    for step in range(STEPS):
        grads = random_grads(step)
        for p, g in zip(reference, grads):
            p.grad = g.clone()
        ref_opt.step()
        shard.step(all_grads(grads))
        expected = torch.cat([p.detach().reshape(-1) for p in reference])
        torch.testing.assert_close(torch.cat(shard.params), expected)
        assert all(shard.steps_of(i) == step + 1 for i in range(len(SPLIT)))
    assert all(p.grad is None for p in shard.params)


def pick(*names: str):
    return pytest.mark.parametrize("spec", [SPECS[n] for n in names], ids=names)


@pick("sgd-momentum", "adam", "adagrad")
def test_partial_steps_leave_other_blocks_alone(spec: optim.OptimizerSpec) -> None:
    shard = optim.ShardOptimizer(spec, to_blocks(model_params()))
    before = [b.clone() for b in shard.params]
    grads = all_grads(random_grads(0))
    shard.step({1: grads[1]})
    shard.step({1: grads[1], 2: grads[2]})
    assert torch.equal(shard.params[0], before[0])
    assert not torch.equal(shard.params[1], before[1])
    assert [shard.steps_of(i) for i in range(3)] == [0, 2, 1]
    shard.step({})
    assert [shard.steps_of(i) for i in range(3)] == [0, 2, 1]


def test_partial_steps_match_a_separate_optimizer_per_block() -> None:
    spec = SPECS["adam-weight-decay"]
    shard = optim.ShardOptimizer(spec, to_blocks(model_params()))
    alone = optim.ShardOptimizer(spec, to_blocks(model_params())[2:])
    for step in range(STEPS):
        grad = all_grads(random_grads(step))[2]
        shard.step({2: grad})
        alone.step({0: grad})
        torch.testing.assert_close(shard.params[2], alone.params[0])


def _first_and_later_steps_mixed(device: str, spec: optim.OptimizerSpec) -> list[torch.Tensor]:
    """Block 1 alone, then all blocks at once (block 1's second step, the others' first), scaled
    as a server scales a sum of two workers' gradients."""
    shard = optim.ShardOptimizer(spec, to_blocks(model_params(), device))
    grads = all_grads(random_grads(0), device)
    shard.step({1: grads[1].clone()}, scale=0.5)
    shard.step({i: g.clone() for i, g in grads.items()}, scale=0.5)
    assert [shard.steps_of(i) for i in range(3)] == [1, 2, 1]
    return [p.cpu() for p in shard.params]


def _halved_steps_one_by_one(spec: optim.OptimizerSpec) -> list[torch.Tensor]:
    shard = optim.ShardOptimizer(spec, to_blocks(model_params()))
    grads = {i: g * 0.5 for i, g in all_grads(random_grads(0)).items()}
    shard.step({1: grads[1].clone()})  # nesterov steps change their grads
    for i in range(3):
        shard.step({i: grads[i].clone()})
    return shard.params


@pick("sgd-momentum", "sgd-nesterov", "adam", "adagrad")
def test_scaled_steps_mixing_first_and_later_steps(spec: optim.OptimizerSpec) -> None:
    expected = _halved_steps_one_by_one(spec)
    for got, want in zip(_first_and_later_steps_mixed("cpu", spec), expected):
        torch.testing.assert_close(got, want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pick("sgd-momentum", "sgd-nesterov", "adam-weight-decay")
def test_cuda_fused_scaled_steps_mixing_first_and_later_steps(spec: optim.OptimizerSpec) -> None:
    """torch's fused SGD cannot step blocks with and without a momentum buffer in one call, and
    the scale goes into the fused kernels as their grad_scale."""
    expected = _halved_steps_one_by_one(spec)
    for got, want in zip(_first_and_later_steps_mixed("cuda", spec), expected):
        torch.testing.assert_close(got, want)


def test_grads_are_not_kept_after_step() -> None:
    shard = optim.ShardOptimizer(SPECS["sgd-momentum"], to_blocks(model_params()))
    buffer = torch.ones(sum(SPLIT))
    shard.step(dict(enumerate(buffer.split(SPLIT))))
    after_one = [b.clone() for b in shard.params]
    buffer.fill_(1e6)  # the receive buffer is reused; the momentum must not alias it
    assert all(torch.equal(a, b) for a, b in zip(after_one, shard.params))
    assert all(p.grad is None for p in shard.params)


def test_grad_of_another_dtype_is_cast() -> None:
    shard = optim.ShardOptimizer(optim.SGD(lr=1.0), [torch.zeros(4)])
    shard.step({0: torch.ones(4, dtype=torch.float64)})
    assert torch.equal(shard.params[0], -torch.ones(4))


def test_bad_grads_are_refused() -> None:
    shard = optim.ShardOptimizer(optim.SGD(lr=1.0), [torch.zeros(4), torch.zeros(2)])
    with pytest.raises(BadRequestError, match="block 5"):
        shard.step({5: torch.ones(4)})
    with pytest.raises(BadRequestError, match="shape"):
        shard.step({0: torch.ones(2)})
    assert all(p.grad is None for p in shard.params)
    assert [shard.steps_of(0), shard.steps_of(1)] == [0, 0]


def test_blocks_must_be_flat() -> None:
    with pytest.raises(ConfigError, match="1-D"):
        optim.ShardOptimizer(optim.SGD(lr=1.0), [torch.zeros(2, 2)])


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_wire_round_trip(spec: optim.OptimizerSpec) -> None:
    wire = spec.to_wire()
    assert wire["name"] == spec.name
    assert optim.optimizer_from_wire(wire) == spec
    packed = msgpack.unpackb(msgpack.packb(wire), raw=False)
    assert optim.optimizer_from_wire(packed) == spec


def test_wire_accepts_defaults_and_ints() -> None:
    assert optim.optimizer_from_wire({"name": "adam"}) == optim.Adam()
    assert optim.optimizer_from_wire({"name": "sgd", "lr": 1}) == optim.SGD(lr=1.0)
    assert optim.SGD(lr=1).to_wire()["lr"] == 1.0


@pytest.mark.parametrize(
    ("wire", "names"),
    [
        ({"name": "rmsprop", "lr": 0.1}, "rmsprop"),
        ({"lr": 0.1}, "name"),
        ({"name": "sgd"}, "lr"),
        ({"name": "sgd", "lr": 0.1, "momentun": 0.9}, "momentun"),
        ({"name": "adam", "betas": [0.9]}, "betas"),
        ({"name": "adam", "betas": [0.9, 1.0]}, r"betas\[1\]"),
        ({"name": "adagrad", "eps": "small"}, "eps"),
        ({"name": "sgd", "lr": 0.1, "nesterov": 1}, "nesterov"),
    ],
)
def test_bad_wire_is_refused(wire: dict, names: str) -> None:
    with pytest.raises(ConfigError, match=names):
        optim.optimizer_from_wire(wire)


def test_wire_must_be_a_dict() -> None:
    with pytest.raises(ConfigError, match="dict"):
        optim.optimizer_from_wire(["sgd"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: optim.SGD(lr=-0.1), "lr"),
        (lambda: optim.SGD(lr=math.inf), "lr"),
        (lambda: optim.SGD(lr=math.nan), "lr"),
        (lambda: optim.SGD(lr=True), "lr"),
        (lambda: optim.SGD(lr=0.1, momentum=-1), "momentum"),
        (lambda: optim.SGD(lr=0.1, dampening=-0.5), "dampening"),
        (lambda: optim.SGD(lr=0.1, weight_decay=-1e-4), "weight_decay"),
        (lambda: optim.SGD(lr=0.1, nesterov=True), "nesterov"),
        (lambda: optim.SGD(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov"),
        (lambda: optim.Adam(lr=-1), "lr"),
        (lambda: optim.Adam(betas=(1.0, 0.999)), r"betas\[0\]"),
        (lambda: optim.Adam(betas=(0.9, -0.1)), r"betas\[1\]"),
        (lambda: optim.Adam(betas=(0.9, 0.99, 0.9)), "betas"),  # type: ignore[arg-type]
        (lambda: optim.Adam(eps=-1e-8), "eps"),
        (lambda: optim.Adam(weight_decay=-0.1), "weight_decay"),
        (lambda: optim.Adagrad(lr=-0.01), "lr"),
        (lambda: optim.Adagrad(eps=-1.0), "eps"),
    ],
)
def test_bad_hyperparameters_are_refused(make, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


def test_sgd_needs_lr() -> None:
    with pytest.raises(TypeError):
        optim.SGD()  # type: ignore[call-arg]


def test_specs_are_frozen_and_hashable() -> None:
    spec = optim.Adam(betas=[0.5, 0.6])  # type: ignore[arg-type]
    assert spec.betas == (0.5, 0.6)
    assert hash(spec) == hash(optim.Adam(betas=(0.5, 0.6)))
    with pytest.raises(AttributeError):
        spec.lr = 1.0  # type: ignore[misc]


@pick("sgd-momentum", "sgd-plain", "adam", "adagrad")
def test_state_dict_round_trip(spec: optim.OptimizerSpec) -> None:
    first = optim.ShardOptimizer(spec, to_blocks(model_params()))
    for step in range(2):
        first.step({0: all_grads(random_grads(step))[0], 2: all_grads(random_grads(step))[2]})
    second = optim.ShardOptimizer(spec, [b.clone() for b in first.params])
    second.load_state_dict(first.state_dict())
    assert [second.steps_of(i) for i in range(3)] == [2, 0, 2]
    for step in range(2, STEPS):
        grads = all_grads(random_grads(step))
        first.step(grads)
        second.step(grads)
        for a, b in zip(first.params, second.params):
            assert torch.equal(a, b)
    assert [second.steps_of(i) for i in range(3)] == [5, 3, 5]


def test_no_blocks() -> None:
    shard = optim.ShardOptimizer(optim.Adam(), [])
    shard.step({})
    shard.load_state_dict(shard.state_dict())


@pytest.mark.parametrize("spec", [optim.SGD(lr=0.1, momentum=0.9), optim.Adam(), optim.Adagrad()], ids=repr)
def test_cpu_uses_torchs_fused_kernels(spec) -> None:
    opt = spec.build([torch.zeros(3)])
    assert opt.param_groups[0]["fused"] is True


def test_a_dtype_without_a_fused_kernel_falls_back_to_foreach() -> None:
    opt = optim.SGD(lr=0.1).build([torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)])
    assert opt.param_groups[0]["foreach"] is True
    assert not opt.param_groups[0]["fused"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_every_update_equals_torchs_foreach_update_in_every_dtype(name: str, dtype: torch.dtype) -> None:
    """Where torch's fused CPU kernel is wrong for a dtype (SGD in bf16 and fp16 leaves most
    elements unchanged), the built optimizer must not use it: every update equals the rule's own
    numbers (float64) up to the dtype's rounding."""
    spec = SPECS[name]

    def run(make, dtype: torch.dtype) -> torch.Tensor:
        param = torch.linspace(-1, 1, 700).to(dtype)
        opt = make([param])
        signs = 1 - 2 * (torch.arange(700) % 3 == 0).long()  # gradients away from zero (Adam in fp16)
        for step in range(3):
            param.grad = (torch.linspace(0.5, 3, 700) * signs * (step + 1)).to(dtype)
            opt.step()
        return param.double()

    got = run(spec.build, dtype)
    want = run(lambda params: spec.torch_class(params, **spec.hyperparameters()), torch.float64)
    ulp = torch.finfo(dtype).eps * (want.abs() + 1)
    assert ((got - want).abs() <= 8 * ulp).all(), f"{name} in {dtype}: off by {(got - want).abs().max()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_small_learning_rate_does_not_hide_a_wrong_fused_kernel(dtype: torch.dtype) -> None:
    param = torch.linspace(-0.01, 0.01, 700).to(dtype)
    start = param.clone()
    opt = optim.SGD(lr=1e-3).build([param])
    param.grad = torch.linspace(-2, 3, 700).to(dtype)
    opt.step()
    step = 1e-3 * param.grad.float()
    want = start.float() - step
    assert ((param.float() - want).abs() <= 2 * torch.finfo(dtype).eps * (start.float().abs() + step.abs())).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pick("sgd-momentum", "sgd-nesterov", "adam-weight-decay", "adagrad")
def test_cuda_matches_cpu(spec: optim.OptimizerSpec) -> None:
    cpu = optim.ShardOptimizer(spec, to_blocks(model_params()))
    gpu = optim.ShardOptimizer(spec, to_blocks(model_params(), "cuda"))
    assert gpu.opt is not None
    if not isinstance(spec, optim.Adagrad):
        assert gpu.opt.param_groups[0]["fused"] is True
    for step in range(STEPS):
        grads = random_grads(step)
        cpu.step(all_grads(grads))
        gpu_grads = all_grads(grads, "cuda") if step % 2 else {
            i: g.pin_memory() for i, g in all_grads(grads).items()
        }
        gpu.step(gpu_grads)
        for a, b in zip(cpu.params, gpu.params):
            torch.testing.assert_close(b.cpu(), a)
        assert gpu.steps_of(0) == step + 1
    restored = optim.ShardOptimizer(spec, [b.cpu() for b in gpu.params])
    restored.load_state_dict(gpu.state_dict())
    grads = all_grads(random_grads(STEPS))
    restored.step({i: g.clone() for i, g in grads.items()})  # nesterov steps change their grads
    gpu.step(grads)
    for a, b in zip(restored.params, gpu.params):
        torch.testing.assert_close(b.cpu(), a)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", [optim.Adam(lr=3e-4), optim.SGD(lr=0.1, momentum=0.9)], ids=repr)
def test_cuda_float32_uses_torchs_fused_kernel(spec: optim.OptimizerSpec) -> None:
    """CUDA's fused Adam is 14 ulps from float64 in the probe (its own roundings): the probe took
    that for a broken kernel, and the server stepped with foreach at twice the time (2.8 ms
    instead of 1.4 for 106M parameters on an H200)."""
    opt = spec.build([torch.zeros(1000, device="cuda")])
    assert opt.param_groups[0]["fused"] is True


SGD_SPECS = [k for k in SPECS if k.startswith("sgd")]
TILED_SIZES = [optim.TILE_BYTES // 4 * 2 + 13, 7]  # a block of three tiles, the last one short; one small


@pytest.mark.parametrize("addends", [2, 3])
@pick(*SGD_SPECS)
def test_sgd_steps_tile_by_tile_from_unsummed_gradients_bit_for_bit(spec: optim.OptimizerSpec, addends: int) -> None:
    """A server's sync step of several workers' gradients, summed a tile at a time just before
    each tile is stepped, gives the same bits as summing whole blocks first."""
    g = torch.Generator().manual_seed(3)
    start = [torch.randn(n, generator=g) for n in TILED_SIZES]
    summed = optim.ShardOptimizer(spec, [p.clone() for p in start])
    tiled = optim.ShardOptimizer(spec, [p.clone() for p in start])
    for step in range(3):
        parts = {i: [torch.randn(n, generator=g) for _ in range(addends)] for i, n in enumerate(TILED_SIZES)}
        sums = {}
        for i, some in parts.items():
            sums[i] = torch.add(some[0], some[1])
            for more in some[2:]:
                sums[i].add_(more)
        first_with_momentum = step == 0 and spec.momentum != 0
        assert [tiled.tiles(i) for i in parts] == [not first_with_momentum] * len(parts)
        tiled.step(parts if not first_with_momentum else {i: s.clone() for i, s in sums.items()}, scale=1 / addends)
        summed.step(sums, scale=1 / addends)  # torch's kernels may change the gradients they are given
        for got, want in zip(tiled.params, summed.params):
            assert torch.equal(got, want)
    assert [tiled.steps_of(i) for i in range(len(TILED_SIZES))] == [3, 3]


@pick("adam", "adagrad")
def test_only_fused_sgd_steps_tile_by_tile(spec: optim.OptimizerSpec) -> None:
    shard = optim.ShardOptimizer(spec, [torch.zeros(10)])
    shard.step({0: torch.ones(10)})
    assert not shard.tiles(0)
    with pytest.raises(BadRequestError, match="summed"):
        shard.step({0: [torch.ones(10), torch.ones(10)]})


def test_unsummed_gradients_must_match_their_block() -> None:
    shard = optim.ShardOptimizer(optim.SGD(lr=0.1), [torch.zeros(10)])
    with pytest.raises(BadRequestError, match="shape"):
        shard.step({0: [torch.ones(10), torch.ones(9)]})


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
@pick(*SGD_SPECS, "adam", "adam-weight-decay")
def test_fused_kernels_are_called_directly_with_torchs_bits(spec: optim.OptimizerSpec, device: str) -> None:
    """Fused SGD and Adam skip torch's step() (its walk over every block) once each stepped block
    has what that step would make, and give the same bits as torch's own fused step, scaled, on
    some blocks at a time."""
    g = torch.Generator().manual_seed(5)
    start = [torch.randn(n, generator=g).to(device) for n in (300, 41, 7)]
    ours = optim.ShardOptimizer(spec, [p.clone() for p in start])
    theirs = [p.clone() for p in start]
    # one torch optimizer per block: torch's fused SGD cannot step blocks with and without a buffer at once
    reference = [spec.torch_class([p], **spec.hyperparameters(), fused=True) for p in theirs]
    for opt in reference:
        opt.grad_scale = torch.tensor(2.0, device=device)  # as GradScaler sets it: the kernel divides as it reads
    steps = {"direct": 0}
    run = ours._run

    def counted_run(stepped, scale):
        opt_step, calls = ours.opt.step, []
        ours.opt.step = lambda: calls.append(1) or opt_step()
        try:
            run(stepped, scale)
        finally:
            ours.opt.step = opt_step
        steps["direct"] += not calls

    ours._run = counted_run
    for step, blocks in enumerate([[0, 2], [0, 1, 2], [0, 2], [1], [0, 1, 2]]):
        grads = {i: torch.randn(start[i].numel(), generator=g).to(device) for i in blocks}
        for i in blocks:
            theirs[i].grad = grads[i].clone()
            reference[i].step()
        ours.step({i: grad.clone() for i, grad in grads.items()}, scale=0.5)
        for got, want in zip(ours.params, theirs):
            assert torch.equal(got, want), f"step {step}"
    # a block's first step goes through torch's step(), which makes its state (SGD without momentum has none)
    assert steps["direct"] == (5 if getattr(spec, "momentum", None) == 0 else 3)


def test_adam_state_without_its_moments_fails_without_counting_a_step() -> None:
    """A state without Adam's moments (a checkpoint of another rule restored into an Adam server)
    fails the step as torch's own step() does, without adding to the block's step count first."""
    shard = optim.ShardOptimizer(optim.Adam(lr=0.01), [torch.zeros(5), torch.zeros(3)])
    shard.step({0: torch.ones(5), 1: torch.ones(3)})
    del shard.opt.state[shard.params[1]]["exp_avg"]
    with pytest.raises(KeyError):
        shard.step({0: torch.ones(5), 1: torch.ones(3)})
    assert [shard.steps_of(0), shard.steps_of(1)] == [1, 1]


def _run_of(sizes: tuple[int, ...], device: str, generator: torch.Generator) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A flat tensor and its consecutive views of ``sizes``, as a server's block and its segments."""
    flat = torch.randn(sum(sizes), generator=generator).to(device)
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]
    return flat, [flat[o:o + n] for o, n in zip(offsets, sizes)]


GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("spec", [optim.SGD(lr=0.1, momentum=0.9, weight_decay=0.01), optim.SGD(lr=0.1),
                                  optim.Adam(lr=0.01, weight_decay=0.01)], ids=repr)
def test_a_run_of_views_steps_as_one_tensor_with_the_bits_of_a_step_per_view(spec: optim.OptimizerSpec,
                                                                              monkeypatch) -> None:
    """``step_run`` steps a block's segments as one flat tensor from one flat gradient, scaled, as
    torch's fused step of each segment does: Adam to the bit, SGD to its last bit (torch's kernel
    fuses a multiply-add for tensors it reads aligned, not for the others). Stepping some of them
    alone in between (Adam's step counts then differ) sends the run back to the per-segment step
    until they agree."""
    g, device = torch.Generator().manual_seed(3), "cuda"
    flat, views = _run_of((300, 41, 7), device, g)
    ours = optim.ShardOptimizer(spec, views)
    theirs = [v.clone() for v in views]
    reference = [spec.torch_class([p], **spec.hyperparameters(), fused=True) for p in theirs]
    for opt in reference:
        opt.grad_scale = torch.tensor(2.0, device=device)
    ran, made, make = [], [], optim._Run.make
    monkeypatch.setattr(optim._Run, "make", lambda *args: made.append(1) or make(*args))
    for step, blocks in enumerate([[0, 1, 2], [0, 1, 2], [0, 1, 2], [1], [0, 1, 2], [0, 1, 2]]):
        grad = torch.randn(flat.numel(), generator=g).to(device)
        pieces = {i: grad[v.storage_offset():v.storage_offset() + v.numel()] for i, v in enumerate(views)}
        for i in blocks:
            theirs[i].grad = pieces[i].clone()
            reference[i].step()
        if len(blocks) == 3:
            ran.append(ours.step_run(0, 3, flat, grad.clone(), scale=0.5))
            if not ran[-1]:
                ours.step({i: pieces[i].clone() for i in blocks}, scale=0.5)
        else:
            ours.step({i: pieces[i].clone() for i in blocks}, scale=0.5)
        for got, want in zip(ours.params, theirs):
            if isinstance(spec, optim.Adam):
                assert torch.equal(got, want), f"step {step}"
            else:  # torch's CUDA SGD rounds a multiply-add of an aligned tensor apart from an unaligned one's
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"step {step}")
    # the first step makes the state (SGD without momentum has none); after block 1 stepped alone,
    # Adam's step counts differ for good
    first = getattr(spec, "momentum", 1) == 0
    assert ran == [first, True, True] + ([False, False] if isinstance(spec, optim.Adam) else [True, True])
    assert [ours.steps_of(i) for i in range(3)] == [5, 6, 5]
    # made (or tried) at the first step, the second (once there is state) and after block 1 stepped
    # alone; Adam's uneven counts are asked once, not at every later step
    assert len(made) == (2 if first else 3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_runs_state_is_views_of_one_tensor_and_survives_a_state_dict_round_trip() -> None:
    """The run's momentum buffers become views of one tensor; a state dict saved from it loads into
    another optimizer, which steps on with the same bits."""
    g = torch.Generator().manual_seed(4)
    spec = optim.SGD(lr=0.1, momentum=0.9)
    flat, views = _run_of((5, 6, 7), "cuda", g)
    ours = optim.ShardOptimizer(spec, views)
    ours.step({0: torch.ones(5, device="cuda"), 1: torch.ones(6, device="cuda"), 2: torch.ones(7, device="cuda")})
    assert ours.step_run(0, 3, flat, torch.ones(18, device="cuda"))
    buffers = [ours.opt.state[p]["momentum_buffer"] for p in views]
    assert len({b.untyped_storage().data_ptr() for b in buffers}) == 1
    copy_flat, copy_views = _run_of((5, 6, 7), "cuda", g)
    copy_flat.copy_(flat)
    other = optim.ShardOptimizer(spec, copy_views)
    other.load_state_dict(ours.state_dict())
    grad = torch.randn(18, generator=g).cuda()
    assert ours.step_run(0, 3, flat, grad.clone()) and other.step_run(0, 3, copy_flat, grad.clone())
    assert torch.equal(flat, copy_flat)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_a_run_is_stepped_as_one_only_on_a_gpu_and_only_as_its_flat_tensors_views_in_order(device: str) -> None:
    """On a CPU the fused kernels round a vector's body and a tensor's tail differently, so a run
    is stepped view by view there; and a run must tile its flat tensor in order."""
    g = torch.Generator().manual_seed(6)
    flat, views = _run_of((5, 6), device, g)
    ordered = optim.ShardOptimizer(optim.SGD(lr=0.1, momentum=0.9), views)
    ordered.step({0: torch.ones(5, device=device), 1: torch.ones(6, device=device)})
    assert ordered.step_run(0, 2, flat, torch.ones(11, device=device)) == (device == "cuda")
    flat, views = _run_of((5, 6), device, g)
    reversed_ = optim.ShardOptimizer(optim.SGD(lr=0.1, momentum=0.9), list(reversed(views)))
    reversed_.step({0: torch.ones(6, device=device), 1: torch.ones(5, device=device)})
    assert not reversed_.step_run(0, 2, flat, torch.ones(11, device=device))
    assert not reversed_.step_run(0, 2, flat.clone(), torch.ones(11, device=device))
