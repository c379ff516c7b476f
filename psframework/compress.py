"""Gradient compression: codecs for the pushes from workers to servers (``ps.compress``).

>>> opt = ps.DistributedOptimizer(model, ps.optim.SGD(lr=0.1), compression=ps.compress.Int8())  # doctest: +SKIP
>>> worker.register(params, optimizer=ps.optim.SGD(lr=0.1),                                     # doctest: +SKIP
...                 compression={"fc.*": ps.compress.TopK(0.01), "*": ps.compress.FP16()})

Each codec turns a flat float32 tensor of ``n`` elements into one flat uint8 payload of exactly
``nbytes(n)`` bytes, and back, with vectorised torch ops on the tensor's device:

====================  ==========================================  ==============================
codec                 payload                                     ``nbytes(n)``
====================  ==========================================  ==============================
``FP16()``            the values as float16                       ``2n``
``BF16()``            the values as bfloat16                      ``2n``
``Int8(block=256)``   per block ``scale = max|x| / 127`` (float32), ``4 ceil(n/block) + n``
                      then ``round(x / scale)`` as int8
``OneBit(block=256)`` per block ``scale = mean |x|`` (float32),   ``4 ceil(n/block) + ceil(n/8)``
                      then one bit per value: ``x >= 0``;
                      decoded as ``+scale`` or ``-scale``
``TopK(ratio)``       the ``k = max(1, round(ratio n))`` values   ``8k``
                      of largest magnitude: int32 indices
                      (ascending), then float32 values
``RandomK(ratio,      ``k`` values at indices drawn from the     ``8k``
seed)``               codec's own generator (seeded ``seed``),
                      laid out like ``TopK``; values unscaled
====================  ==========================================  ==============================

``OneBit``, ``TopK`` and ``RandomK`` keep an error-feedback residual per tensor on the worker by
default (``error_feedback=False`` turns it off; the others take ``error_feedback=True``): what
the encoding lost is added to the tensor's next gradient (``ErrorFeedback``). A gradient with a
NaN or an infinity, or one that float16 cannot hold, is a ``ConfigError`` naming the tensor.
``none`` keeps a tensor exact (a pattern that must not match a broader one's codec).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .errors import ConfigError

_SCALE = 4  # bytes of a float32 block scale
_SAMPLED = 1 << 16  # TopK on a CPU: tensors of more values are first cut down by a sampled threshold
_INDEX = 4  # bytes of an int32 index


class Codec:
    """One way of encoding a flat float32 tensor. ``wire`` names it in request headers."""

    wire = ""
    error_feedback = False

    def nbytes(self, numel: int) -> int:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The payload of a flat, finite float32 tensor: a flat uint8 tensor on ``x``'s device."""
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """The flat float32 tensor of ``numel`` elements that ``payload`` stands for."""
        raise NotImplementedError

    def residual(self, x: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        """What encoding ``x`` as ``payload`` lost, computed in ``x``'s place."""
        return x.sub_(self.decode(payload, x.numel()))

    def __repr__(self) -> str:
        return f"ps.compress.{type(self).__name__}({self.args()})"

    def args(self) -> str:
        return "" if not self.error_feedback else "error_feedback=True"


class _NoCodec(Codec):
    """``ps.compress.none``: the tensor goes as it is."""

    wire = ""

    def __repr__(self) -> str:
        return "ps.compress.none"


none = _NoCodec()


class _Cast(Codec):
    dtype = torch.float16

    def __init__(self, error_feedback: bool = False):
        self.error_feedback = _flag(error_feedback, type(self).__name__)

    def nbytes(self, numel: int) -> int:
        return 2 * numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype).view(torch.uint8)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return _aligned(payload, 2).view(self.dtype).float()


class FP16(_Cast):
    """Values rounded to float16 (their range is ±65504: larger ones are an error, use BF16)."""

    wire = "fp16"
    dtype = torch.float16


class BF16(_Cast):
    """Values rounded to bfloat16: float32's range, 8 bits of mantissa."""

    wire = "bf16"
    dtype = torch.bfloat16


class _Blocked(Codec):
    def __init__(self, block: int, error_feedback: bool):
        if isinstance(block, bool) or not isinstance(block, int) or block < 1:
            raise ConfigError(f"{type(self).__name__}(block={block!r}): block must be an int >= 1")
        self.block = block
        self.error_feedback = _flag(error_feedback, type(self).__name__)
        self.wire = f"{self.wire_name}/{block}"

    wire_name = ""

    def args(self) -> str:
        return f"block={self.block}, error_feedback={self.error_feedback}"

    def blocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (flat, contiguous) zero-padded to whole blocks, one block per row."""
        full = self.blocks(x.numel()) * self.block
        if full == x.numel():
            return x.view(-1, self.block)
        rows = x.new_zeros(full)  # torch's pad() took 5x as long
        rows[:x.numel()] = x
        return rows.view(-1, self.block)

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        nb = self.blocks(numel)
        payload = _aligned(payload, _SCALE)
        return payload[:_SCALE * nb].view(torch.float32), payload[_SCALE * nb:]


class Int8(_Blocked):
    """Per block of ``block`` values one float32 scale ``max|x| / 127``; values ``round(x / scale)``
    as int8 (ties to even)."""

    wire_name = "int8"

    def __init__(self, block: int = 256, error_feedback: bool = False):
        super().__init__(block, error_feedback)

    def nbytes(self, numel: int) -> int:
        return _SCALE * self.blocks(numel) + numel

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        rows = self._rows(x)
        scale = rows.abs().amax(dim=1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8).view(-1)[:x.numel()]
        return torch.cat([scale.view(torch.uint8), q.view(torch.uint8)])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        scale, q = self._split(payload, numel)
        return (self._rows(q.view(torch.int8).float()) * scale[:, None]).view(-1)[:numel]


_SHIFTS = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)  # value 8j + i: bit 7 - i of byte j


class OneBit(_Blocked):
    """Per block of ``block`` values one float32 scale, their mean absolute value; one bit per
    value, set where ``x >= 0``; decoded as ``+scale`` or ``-scale``."""

    wire_name = "onebit"

    def __init__(self, block: int = 256, error_feedback: bool = True):
        super().__init__(block, error_feedback)

    def nbytes(self, numel: int) -> int:
        return _SCALE * self.blocks(numel) + -(-numel // 8)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        n = x.numel()
        if n == 0:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        counts = torch.full((self.blocks(n),), float(self.block), device=x.device)
        counts[-1] = n - (self.blocks(n) - 1) * self.block
        scale = self._rows(x).abs().sum(dim=1) / counts
        bits = torch.nn.functional.pad((x >= 0).to(torch.uint8), (0, -n % 8)).view(-1, 8)
        packed = bits[:, 0] << 7
        for i in range(1, 8):  # eight vectorised passes, one per bit position
            packed |= bits[:, i] << (7 - i)
        return torch.cat([scale.view(torch.uint8), packed])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        scale, packed = self._split(payload, numel)
        bits = ((packed[:, None] >> _SHIFTS.to(packed.device)) & 1).view(-1)[:numel]
        signs = self._rows(bits.to(torch.float32).mul_(2).sub_(1))  # +1 or -1 (0 in the padding)
        return (signs * scale[:, None]).view(-1)[:numel]


class _Sparse(Codec):
    """``k`` values at chosen indices: int32 indices (ascending), then the float32 values."""

    def __init__(self, ratio: float, error_feedback: bool):
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise ConfigError(f"{type(self).__name__}(ratio={ratio!r}): ratio must be a number in (0, 1], "
                              "the share of values sent, e.g. 0.01")
        self.ratio = float(ratio)
        self.error_feedback = _flag(error_feedback, type(self).__name__)
        self.wire = f"{self.wire_name}/{self.ratio!r}"

    wire_name = ""

    def args(self) -> str:
        return f"{self.ratio!r}, error_feedback={self.error_feedback}"

    def k(self, numel: int) -> int:
        return min(numel, max(1, round(self.ratio * numel)))

    def nbytes(self, numel: int) -> int:
        return (_INDEX + 4) * self.k(numel)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        index = self.indices(x).sort().values
        values = x[index]
        return torch.cat([index.to(torch.int32).view(torch.uint8), values.view(torch.uint8)])

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        index, values = self._split(payload, numel)
        return torch.zeros(numel, device=payload.device).index_put_((index,), values)

    def residual(self, x: torch.Tensor, payload: torch.Tensor) -> torch.Tensor:
        # the sent values are x's own, exactly: all that was lost is x off the sent indices
        # (one scatter, where subtracting the decoded payload took three passes over x)
        return x.index_fill_(0, self._split(payload, x.numel())[0], 0.0)

    def _split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k(numel)
        payload = _aligned(payload, _INDEX)
        return payload[:_INDEX * k].view(torch.int32).long(), payload[_INDEX * k:].view(torch.float32)


class TopK(_Sparse):
    """The ``k = max(1, round(ratio * n))`` values of largest magnitude."""

    wire_name = "topk"

    def __init__(self, ratio: float, error_feedback: bool = True):
        super().__init__(ratio, error_feedback)

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        k = self.k(x.numel())
        if x.is_cuda or x.numel() < _SAMPLED:
            return x.abs().topk(k, sorted=False).indices
        return torch.from_numpy(_top_k_on_cpu(x.detach().numpy(), k))


def _top_k_on_cpu(x: np.ndarray, k: int) -> np.ndarray:
    """The indices of ``x``'s ``k`` values of largest magnitude, in no order. A full top-k of millions
    of values costs tens of ms: first keep the values above a threshold that a strided sample puts a
    little below the k-th largest, then take the top k of those (the same set; all values where the
    sample misjudged). In numpy: on one thread its compare and nonzero take a third of torch's time."""
    magnitude = np.abs(x)
    sample = magnitude[::x.size // _SAMPLED]
    rank = min(sample.size, 2 * -(-k * sample.size // x.size) + 8)
    threshold = np.partition(sample, sample.size - rank)[sample.size - rank]
    candidates = np.flatnonzero(magnitude >= threshold)
    if candidates.size < k:
        candidates = np.arange(x.size)
    if candidates.size == k:
        return candidates
    return candidates[np.argpartition(magnitude[candidates], candidates.size - k)[candidates.size - k:]]


class RandomK(_Sparse):
    """``k`` values at random distinct indices, drawn from this codec's generator (seeded with
    ``seed``, advanced by every tensor it encodes); values are sent as they are, not rescaled."""

    wire_name = "randomk"

    def __init__(self, ratio: float, seed: int = 0, error_feedback: bool = True):
        super().__init__(ratio, error_feedback)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"RandomK(seed={seed!r}): seed must be an int")
        self.seed = seed
        self._generator = torch.Generator().manual_seed(seed)

    def indices(self, x: torch.Tensor) -> torch.Tensor:
        n, k = x.numel(), self.k(x.numel())
        if 4 * k > n:
            return torch.randperm(n, generator=self._generator)[:k].to(x.device)
        # a permutation of millions costs tens of ms: draw a few more than k with replacement, and
        # keep k of the distinct ones (every k-subset is as likely); rarely too few: draw again
        while True:
            drawn = torch.randint(n, (k + k // 4 + 16,), generator=self._generator).unique()
            if drawn.numel() >= k:
                return drawn[torch.randperm(drawn.numel(), generator=self._generator)[:k]].to(x.device)


def _flag(value: bool, codec: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{codec}(error_feedback={value!r}): error_feedback must be True or False")
    return value


def _aligned(payload: torch.Tensor, size: int) -> torch.Tensor:
    # a received frame may start at any byte; views as wider types need aligned memory
    return payload if payload.data_ptr() % size == 0 else payload.clone()


def from_wire(wire: str) -> Codec:
    """The codec a request header names (what a server decodes with); ``ValueError`` if none."""
    name, _, arg = wire.partition("/")
    if name in ("fp16", "bf16") and not arg:
        return FP16() if name == "fp16" else BF16()
    kinds = {"int8": (Int8, int), "onebit": (OneBit, int), "topk": (TopK, float), "randomk": (TopK, float)}
    if name not in kinds or not arg:
        raise ValueError(f"unknown codec {wire!r}")
    kind, parse = kinds[name]  # a RandomK payload decodes as a TopK one: indices, then values
    try:
        return kind(parse(arg))
    except (ValueError, ConfigError) as exc:
        raise ValueError(f"bad codec {wire!r}: {exc}") from None


class ErrorFeedback:
    """A codec with a residual per key: what an encoding lost is added to the key's next tensor,
    so over steps nothing is lost but the last residual. Without ``codec.error_feedback`` it only
    checks and encodes."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self.residuals: dict[object, torch.Tensor] = {}

    def encode(self, key: object, x: torch.Tensor, name: str) -> torch.Tensor:
        """The payload of ``x`` (flat float32) plus the key's residual; ``name`` is for errors."""
        check_finite(x, name)
        if not self.codec.error_feedback:
            return self._checked(self.codec.encode(x), name)
        residual = self.residuals.get(key)
        if residual is None or isinstance(self.codec, FP16):
            # FP16 may refuse the sum (beyond its range), and the residual must then stay as it was
            corrected = x.clone() if residual is None else residual + x
        else:
            corrected = residual.add_(x)  # the residual is ours to reuse
        payload = self._checked(self.codec.encode(corrected), name)
        self.residuals[key] = self.codec.residual(corrected, payload)
        return payload

    def _checked(self, payload: torch.Tensor, name: str) -> torch.Tensor:
        overflow = isinstance(self.codec, FP16) and not bool(torch.isfinite(
            payload.view(torch.float16).sum(dtype=torch.float32)))  # finite sum: every value finite
        if overflow:
            raise ConfigError(f"gradient of {name!r} has values beyond float16's range (±65504): "
                              "compress it with ps.compress.BF16() instead")
        return payload


def check_finite(x: torch.Tensor, name: str) -> None:
    # a finite sum proves every value finite (NaN and infinities propagate) at a fraction of the cost
    # of isfinite(x).all(); an overflowing sum of finite values falls to the exact check
    if bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all()):
        return
    nan = bool(torch.isnan(x).any())
    raise ConfigError(f"gradient of {name!r} has {'NaN' if nan else 'infinite'} values: a compressed push "
                      "would spread them over its whole block; fix the loss (or clip the gradients)")


def payload_bytes(codec: Optional[Codec], numel: int, itemsize: int = 4) -> int:
    """Bytes on the wire for ``numel`` values: the codec's payload, or the raw values."""
    return numel * itemsize if codec is None or codec is none else codec.nbytes(numel)


__all__ = ["BF16", "Codec", "ErrorFeedback", "FP16", "Int8", "OneBit", "RandomK", "TopK", "check_finite",
           "from_wire", "none", "payload_bytes"]
