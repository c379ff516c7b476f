"""Zero-copy byte views of tensors, received frames as tensors, and dtype names on the wire."""

from __future__ import annotations

import ctypes

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


def host_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Copy between contiguous CPU tensors of equal size in bytes: one plain memcpy, without the
    GIL and without torch's intra-op threads (which on a many-core host spread a copy over all
    cores and cost more than they give). A step copies each of a model's tensors twice through
    here, so the checks use torch's cheapest accessors (``.device`` alone costs 0.3 us)."""
    nbytes = dst.nbytes
    if not (dst.is_cpu and src.is_cpu and src.nbytes == nbytes and dst.is_contiguous() and src.is_contiguous()):
        raise ValueError("host_copy needs contiguous CPU tensors of the same size in bytes")
    if nbytes:
        ctypes.memmove(dst.data_ptr(), src.data_ptr(), nbytes)


def host_tensor(frame: object, dtype: torch.dtype) -> torch.Tensor:
    """A received frame as a flat tensor, without a copy where its memory is aligned."""
    if not len(memoryview(frame)):
        return torch.empty(0, dtype=dtype)
    tensor = torch.frombuffer(frame, dtype=dtype)
    # ZeroMQ lands messages under 8 KiB at any offset of its read buffer; copy those few bytes
    return tensor.clone() if tensor.data_ptr() % tensor.element_size() else tensor


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ProtocolError(f"unknown dtype name {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
