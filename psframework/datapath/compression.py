"""Codecs in the data path: which tensors a worker compresses, their residuals, and the server's decode.

A worker's ``Compression`` is planned once at ``register()`` from ``compression=`` (one codec, or
name patterns to codecs, first match wins, fnmatch syntax) and ``pull_compression=``. Only float32
tensors of at least ``PS_COMPRESS_MIN_BYTES`` are compressed; a block that goes through a lane (one
host, shared memory or CUDA IPC) is not, unless ``PS_COMPRESS_LOCAL=1`` sends it over the socket
instead: a memory copy gains nothing from fewer bytes. Each segment of a tensor (its piece in a
block) is encoded on its own, and its residual kept under its offset.

A request header names the codec of each pushed segment (``codecs``) and of each segment the worker
wants rounded in the answer (``pull_codecs``); ``wire_codecs`` turns those names back into codecs
on the server, refusing what does not fit.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Mapping
from typing import Any, Optional, Union

import torch

from .. import protocol as P
from ..compress import BF16, FP16, Codec, ErrorFeedback, Int8, from_wire, none
from ..config import NodeConfig
from ..errors import ConfigError
from ..sharding import Segment, TensorSpec

CompressionArg = Union[None, Codec, Mapping[str, Codec]]
PULL_CODECS = (FP16, BF16, Int8)  # roundings of values, with nothing to feed back


class Compression:
    """The codecs of one worker's registered tensors, and their error-feedback residuals."""

    def __init__(self, push: Optional[dict[str, Codec]] = None, pull: Optional[dict[str, Codec]] = None,
                 local: bool = False):
        self._push = {name: ErrorFeedback(codec) for name, codec in (push or {}).items()}
        self._pull = pull or {}
        self.local = local  # compress to servers of our own host too (over the socket, not the lane)

    @classmethod
    def plan(cls, specs: list[TensorSpec], compression: CompressionArg, pull_compression: Optional[Codec],
             config: NodeConfig) -> "Compression":
        """``ConfigError`` for anything but a codec or a mapping of patterns to codecs."""
        min_bytes = config.compress_min_bytes
        patterns = _patterns(compression, [s.name for s in specs])
        _check_pull(pull_compression)
        fit = [s for s in specs if s.dtype == "float32" and s.nbytes >= min_bytes and s.numel]
        push = {s.name: codec for s in fit if (codec := _match(patterns, s.name)) is not None}
        pull = {s.name: pull_compression for s in fit if pull_compression not in (None, none)}
        return cls(push, pull, config.compress_local)

    def push_codec(self, name: str) -> Optional[Codec]:
        feedback = self._push.get(name)
        return feedback.codec if feedback is not None else None

    def pull_codec(self, name: str) -> Optional[Codec]:
        return self._pull.get(name)

    def keeps_off_lane(self, op: type, names: list[str]) -> bool:
        """Whether a block of these tensors skips its lane to go compressed over the socket."""
        return self.local and any(self._codec(op, name) is not None for name in names)

    def _codec(self, op: type, name: str) -> Optional[Codec]:
        push = self.push_codec(name) if op in (P.Push, P.PushPull) else None
        return push or (self.pull_codec(name) if op in (P.Pull, P.PushPull) else None)

    def encode(self, name: str, tensor: torch.Tensor, segments: list[Segment]) -> list[torch.Tensor]:
        """The payloads of these segments of ``tensor`` (on its device, on the current stream), each
        with its residual added and the residual updated."""
        flat = tensor.detach().reshape(-1)
        feedback = self._push[name]
        return [feedback.encode(seg.offset, flat[seg.offset:seg.offset + seg.numel], name) for seg in segments]


def _patterns(compression: CompressionArg, names: list[str]) -> list[tuple[str, Codec]]:
    if compression is None:
        return []
    if isinstance(compression, Codec):
        return [("*", compression)]
    if not isinstance(compression, Mapping):
        raise ConfigError(f"compression= takes a codec (e.g. ps.compress.Int8()) or a dict of name patterns to "
                          f"codecs, got {type(compression).__name__}")
    for pattern, codec in compression.items():
        if not isinstance(pattern, str):
            raise ConfigError(f"compression= pattern {pattern!r} is a {type(pattern).__name__}; patterns are "
                              "strings such as 'fc.*' or '*'")
        if not isinstance(codec, Codec):
            raise ConfigError(f"compression= pattern {pattern!r} maps to {codec!r}, not a codec of ps.compress "
                              "(use ps.compress.none to keep tensors exact)")
        if not fnmatch.filter(names, pattern):
            raise ConfigError(f"compression= pattern {pattern!r} matches none of the registered tensors "
                              f"({', '.join(names[:8])}{', ...' if len(names) > 8 else ''})")
    return list(compression.items())


def _match(patterns: list[tuple[str, Codec]], name: str) -> Optional[Codec]:
    for pattern, codec in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return None if codec is none else codec
    return None


def _check_pull(codec: Any) -> None:
    if codec is None or codec is none:
        return
    if type(codec) not in PULL_CODECS or codec.error_feedback:
        raise ConfigError(f"pull_compression= takes ps.compress.FP16(), BF16() or Int8() (without error "
                          f"feedback), got {codec!r}: pulls are rounded copies of the servers' values, with "
                          "nothing to feed back")


_from_wire = functools.lru_cache(maxsize=256)(from_wire)  # decoding needs no state: one codec per name


def wire_codecs(names: list[str], count: int, what: str, dtype: str, pulls: bool = False) -> list[Optional[Codec]]:
    """The codecs a request header names for ``count`` segments (none named: all raw); ``Rejected``
    if they do not fit."""
    if not names:
        return [None] * count
    if len(names) != count:
        raise P.Rejected(P.BAD_REQUEST, f"{what}: {len(names)} codecs for {count} segments")
    if dtype != "float32" and any(names):
        raise P.Rejected(P.BAD_REQUEST, f"{what}: compressed segments must be float32, the block is {dtype}")
    try:
        codecs = [_from_wire(name) if name else None for name in names]
    except ValueError as exc:
        raise P.Rejected(P.BAD_REQUEST, f"{what}: {exc}") from None
    if pulls and any(c is not None and type(c) not in PULL_CODECS for c in codecs):
        raise P.Rejected(P.BAD_REQUEST, f"{what}: pulls are rounded with fp16, bf16 or int8 only")
    return codecs


__all__ = ["Compression", "CompressionArg", "wire_codecs"]
