"""The codecs of ps.compress against their formulas, with hand-computed values, and error feedback."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import psframework as ps
from psframework import compress as C

T = torch.tensor


def roundtrip(codec, x: torch.Tensor) -> torch.Tensor:
    payload = codec.encode(x)
    assert payload.dtype == torch.uint8 and payload.numel() == codec.nbytes(x.numel())
    return codec.decode(payload, x.numel())


def exact(got: torch.Tensor, want) -> None:
    assert got.dtype == torch.float32
    assert torch.equal(got, T(want, dtype=torch.float32)), f"{got.tolist()} != {want}"


# ------------------------------------------------------------------------------ hand-computed values


def test_fp16_and_bf16_round_to_their_type():
    x = T([1.0, 1 + 2**-11, 1 + 2**-10, -3.0, 0.0])  # 1 + 2**-11 ties to even: 1.0 in float16
    exact(roundtrip(C.FP16(), x), [1.0, 1.0, 1 + 2**-10, -3.0, 0.0])
    y = T([1.0, 1 + 2**-8, 1 + 2**-7, 3 * 2.0**100, -0.0])  # bfloat16: 8 bits of mantissa, float32's range
    exact(roundtrip(C.BF16(), y), [1.0, 1.0, 1 + 2**-7, 3 * 2.0**100, 0.0])
    assert C.FP16().nbytes(7) == C.BF16().nbytes(7) == 14


def test_int8_scales_each_block_by_its_largest_magnitude():
    # block 0: max 254 -> scale 2: 254/2=127, 3/2=1.5->2, -5/2=-2.5->-2 (ties to even), 1/2=0.5->0
    # block 1: max 127 -> scale 1; block 2 (the edge, 1 value): -0.5 -> scale 0.5/127, q = -127
    x = T([254.0, 3.0, -5.0, 1.0, 127.0, -63.5, 0.25, 10.0, -0.5])
    got = roundtrip(C.Int8(block=4), x)
    exact(got[:8], [254.0, 4.0, -4.0, 0.0, 127.0, -64.0, 0.0, 10.0])
    assert got[8].item() == pytest.approx(-0.5, rel=1e-7)
    assert C.Int8(block=4).nbytes(9) == 3 * 4 + 9


def test_onebit_sends_signs_and_the_mean_magnitude_of_each_block():
    # block 0: mean(1, 2, 3) = 2; block 1 at the edge: mean(4, 0) = 2, and 0 counts as positive
    exact(roundtrip(C.OneBit(block=3), T([1.0, -2.0, 3.0, -4.0, 0.0])), [2.0, -2.0, 2.0, -2.0, 2.0])
    assert C.OneBit(block=3).nbytes(5) == 2 * 4 + 1
    assert C.OneBit(block=256).nbytes(17) == 4 + 3  # 17 bits take 3 bytes


def test_topk_keeps_the_largest_magnitudes():
    x = T([0.1, -3.0, 2.0, 0.5, -0.2])
    exact(roundtrip(C.TopK(0.4), x), [0.0, -3.0, 2.0, 0.0, 0.0])
    payload = C.TopK(0.4).encode(x)
    assert payload[:8].view(torch.int32).tolist() == [1, 2]  # ascending indices, then the values
    assert payload[8:].view(torch.float32).tolist() == [-3.0, 2.0]
    assert C.TopK(0.01).k(5) == 1 and C.TopK(0.01).nbytes(1000) == 8 * 10


def test_randomk_keeps_k_values_where_its_seeded_generator_says():
    x = torch.arange(1.0, 11.0)
    a, b = roundtrip(C.RandomK(0.3, seed=7), x), roundtrip(C.RandomK(0.3, seed=7), x)
    assert torch.equal(a, b)  # the same seed, the same indices
    kept = a.nonzero().view(-1)
    assert kept.numel() == 3 and torch.equal(a[kept], x[kept])
    codec = C.RandomK(0.3, seed=7)
    first, second = roundtrip(codec, x), roundtrip(codec, x)
    assert not torch.equal(first, second)  # the generator moves on (with this seed, 3 of 10 differ)


@pytest.mark.parametrize("x", [torch.randn(300_000, generator=torch.Generator().manual_seed(2)),
                               torch.cat([torch.ones(200_000), torch.zeros(100_000)]),  # ties everywhere
                               torch.linspace(0, 1, 300_000) ** 4],  # the sample misjudges: the full top-k
                         ids=["random", "ties", "skewed"])
def test_topk_of_a_large_tensor_is_the_full_top_k(x):
    codec = C.TopK(0.01)
    got = codec.indices(x)
    assert got.numel() == codec.k(x.numel()) == got.unique().numel()
    assert x.abs()[got].min() >= x.abs().topk(codec.k(x.numel())).values.min()


def test_randomk_of_a_large_tensor_draws_k_distinct_indices():
    codec = C.RandomK(0.01, seed=5)
    got = codec.indices(torch.zeros(1_000_000))
    assert got.numel() == 10_000 == got.unique().numel() and 0 <= got.min() and got.max() < 1_000_000
    assert not torch.equal(got.sort().values, codec.indices(torch.zeros(1_000_000)).sort().values)


@pytest.mark.parametrize("codec", [C.FP16(), C.BF16(), C.Int8(), C.Int8(block=5), C.OneBit(), C.OneBit(block=7),
                                   C.TopK(0.1), C.RandomK(0.1)], ids=repr)
@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1001])
def test_odd_sizes_and_block_edges(codec, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    got = roundtrip(codec, x)
    assert got.shape == (n,)
    if isinstance(codec, C.OneBit):
        assert torch.equal(got > 0, x >= 0)
    elif isinstance(codec, (C.TopK, C.RandomK)):
        assert (got != 0).sum() <= codec.k(n)
    else:
        assert torch.allclose(got, x, atol=x.abs().max().item() / 100)


@pytest.mark.parametrize("codec", [C.FP16(), C.BF16(), C.Int8(block=4), C.OneBit(block=4), C.TopK(0.5),
                                   C.RandomK(0.5)], ids=repr)
def test_zeros_stay_zeros(codec):
    exact(roundtrip(codec, torch.zeros(9)), [0.0] * 9)


def test_int8_of_a_block_of_zeros_next_to_a_nonzero_block():
    exact(roundtrip(C.Int8(block=2), T([0.0, 0.0, 127.0, 1.0])), [0.0, 0.0, 127.0, 1.0])


def test_decode_accepts_a_payload_at_an_odd_address():
    # ZeroMQ delivers small frames at any offset of its buffer
    codec, x = C.Int8(block=3), T([3.0, -1.5, 127.0, 2.0])
    buffer = torch.empty(codec.nbytes(4) + 1, dtype=torch.uint8)
    buffer[1:] = codec.encode(x)
    assert torch.equal(codec.decode(buffer[1:], 4), codec.decode(codec.encode(x), 4))


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("value,word", [(math.nan, "NaN"), (math.inf, "infinite"), (-math.inf, "infinite")])
@pytest.mark.parametrize("codec", [C.FP16(), C.Int8(), C.OneBit(), C.TopK(0.5)], ids=repr)
def test_a_gradient_that_is_not_finite_is_an_error_naming_the_tensor(codec, value, word):
    x = T([1.0, value, 2.0])
    with pytest.raises(ps.ConfigError, match=rf"gradient of 'fc.weight' has {word} values"):
        C.ErrorFeedback(codec).encode("fc.weight", x, "fc.weight")


def test_fp16_overflow_is_an_error_that_suggests_bf16():
    with pytest.raises(ps.ConfigError, match=r"'w'.*beyond float16's range.*BF16"):
        C.ErrorFeedback(C.FP16()).encode("w", T([1e6]), "w")


def test_a_refused_push_leaves_the_error_feedback_residual_as_it_was():
    """FP16 with error feedback refuses a sum beyond its range: that push did not happen, so the
    next one carries the residual from before it, not the refused gradient."""
    feedback = C.ErrorFeedback(C.FP16(error_feedback=True))
    feedback.encode("w", T([1.0 + 2 ** -12, 3.0]), "w")  # float16 loses 2**-12: the residual keeps it
    before = feedback.residuals["w"].clone()
    with pytest.raises(ps.ConfigError, match="beyond float16's range"):
        feedback.encode("w", T([1e6, 1.0]), "w")
    assert torch.equal(feedback.residuals["w"], before)
    payload = feedback.encode("w", T([2.0 ** -12, 0.0]), "w")
    exact(C.FP16().decode(payload, 2), [2.0 ** -11, 0.0])  # the residual and the new gradient, nothing more


@pytest.mark.parametrize("make,word", [
    (lambda: C.TopK(0), "ratio"), (lambda: C.TopK(1.5), "ratio"), (lambda: C.TopK("0.1"), "ratio"),
    (lambda: C.RandomK(-0.1), "ratio"), (lambda: C.RandomK(0.1, seed=1.5), "seed"),
    (lambda: C.Int8(block=0), "block"), (lambda: C.OneBit(block=2.0), "block"),
    (lambda: C.TopK(0.1, error_feedback="yes"), "error_feedback"),
])
def test_bad_codec_arguments_are_config_errors(make, word):
    with pytest.raises(ps.ConfigError, match=word):
        make()


@pytest.mark.parametrize("wire", ["", "zip", "int8", "int8/x", "topk/2", "fp16/3", "onebit/0"])
def test_unknown_wire_names_are_refused(wire):
    with pytest.raises(ValueError):
        C.from_wire(wire)


@pytest.mark.parametrize("codec", [C.FP16(), C.BF16(), C.Int8(block=9), C.OneBit(block=3), C.TopK(0.25),
                                   C.RandomK(0.25, seed=4)], ids=repr)
def test_the_wire_name_decodes_like_the_codec(codec):
    x = torch.randn(50, generator=torch.Generator().manual_seed(1))
    payload = codec.encode(x)
    assert torch.equal(C.from_wire(codec.wire).decode(payload, 50), codec.decode(payload, 50))


def test_ps_compress_is_public():
    assert ps.compress.TopK is C.TopK and "compress" in ps.__all__
    assert repr(ps.compress.none) == "ps.compress.none"


# -------------------------------------------------------------------------------- error feedback


@pytest.mark.parametrize("make", [lambda: C.OneBit(block=4), lambda: C.TopK(0.1), lambda: C.RandomK(0.2, seed=3),
                                  lambda: C.Int8(block=8, error_feedback=True)], ids=["onebit", "topk", "randomk",
                                                                                     "int8"])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 300), steps=st.integers(1, 8), seed=st.integers(0, 2**31 - 1))
def test_error_feedback_loses_nothing_but_the_last_residual(make, n, steps, seed):
    g = torch.Generator().manual_seed(seed)
    feedback = C.ErrorFeedback(make())
    raw, decoded = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(steps):
        grad = torch.randn(n, generator=g)
        raw += grad.double()
        decoded += feedback.codec.decode(feedback.encode("w", grad, "w"), n).double()
    total = decoded + feedback.residuals["w"].double()
    # each step rounds the corrected gradient and the residual once in float32
    bound = 4 * steps * torch.finfo(torch.float32).eps * (raw.abs().max() + decoded.abs().max() + 1)
    assert (total - raw).abs().max() <= bound


@pytest.mark.parametrize("make", [lambda: C.TopK(0.1), lambda: C.RandomK(0.2, seed=3)], ids=["topk", "randomk"])
@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 3000), seed=st.integers(0, 2**31 - 1))
def test_a_sparse_codecs_residual_is_exactly_the_input_less_what_it_decodes_to(make, n, seed):
    codec = make()
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    payload = codec.encode(x)
    expected = x - codec.decode(payload, n)
    got = codec.residual(x.clone(), payload)
    assert torch.equal(got, expected) and torch.equal(got.signbit(), expected.signbit())  # bitwise, zeros too


def test_error_feedback_sends_what_was_left_out_in_a_later_step():
    feedback = C.ErrorFeedback(C.TopK(0.5))
    first = feedback.codec.decode(feedback.encode("w", T([3.0, 1.0]), "w"), 2)
    exact(first, [3.0, 0.0])
    exact(feedback.residuals["w"], [0.0, 1.0])
    second = feedback.codec.decode(feedback.encode("w", T([0.5, 0.75]), "w"), 2)
    exact(second, [0.0, 1.75])  # 0.75 + the 1.0 left out before beats 0.5
    exact(feedback.residuals["w"], [0.5, 0.0])


def test_without_error_feedback_nothing_is_kept():
    feedback = C.ErrorFeedback(C.TopK(0.5, error_feedback=False))
    feedback.encode("w", T([3.0, 1.0]), "w")
    assert feedback.residuals == {}
    assert not C.FP16().error_feedback and not C.Int8().error_feedback
    assert C.OneBit().error_feedback and C.TopK(0.1).error_feedback and C.RandomK(0.1).error_feedback


def test_residuals_are_kept_per_key():
    feedback = C.ErrorFeedback(C.TopK(0.5))
    feedback.encode(("a", 0), T([3.0, 1.0]), "a")
    feedback.encode(("b", 0), T([1.0, 3.0]), "b")
    exact(feedback.residuals[("a", 0)], [0.0, 1.0])
    exact(feedback.residuals[("b", 0)], [1.0, 0.0])
