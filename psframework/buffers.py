"""Zero-copy byte views of tensors, and dtype names on the wire."""

from __future__ import annotations

import torch

from .errors import ProtocolError


def byte_view(tensor: torch.Tensor) -> memoryview:
    """A writable, zero-copy byte view of a contiguous CPU tensor (any dtype, any shape)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("byte_view needs a contiguous CPU tensor")
    flat = tensor.detach().reshape(-1)
    if flat.numel() == 0:
        return memoryview(bytearray())
    return memoryview(flat.view(torch.uint8).numpy())


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"unknown dtype name {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
