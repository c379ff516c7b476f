"""Requests and responses of ``POST /predict``: JSON, or safetensors for speed.

JSON: ``{"inputs": [...]}`` (one example, or a batch of them) -> ``{"outputs": [...], "version": V}``.
Binary (``Content-Type: application/x-safetensors``): a safetensors file with the tensor ``inputs``
-> one with ``outputs``, the version in its metadata. Either way the response's ``X-Model-Version``
header says which version answered. Anything the model cannot take is a ``BadRequest`` (a 4xx
with a message that says what was wrong), checked before the request joins a batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..buffers import dtype_from_name, dtype_name
from ..errors import ProtocolError
from .http import BadRequest

BINARY = "application/x-safetensors"


@dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]  # of one example
    dtype: torch.dtype
    max_rows: int
    max_bytes: int

    @classmethod
    def of(cls, shape: tuple[int, ...], dtype: str, max_rows: int, max_bytes: int) -> "InputSpec":
        try:
            return cls(tuple(shape), dtype_from_name(dtype), max_rows, max_bytes)
        except ProtocolError:
            raise ValueError(f"--input-dtype {dtype!r} is not a torch dtype (float32, int64, ...)") from None

    def describe(self) -> str:
        one = ", ".join(map(str, self.shape))
        return f"one example of shape ({one}{',' if len(self.shape) == 1 else ''}) or a batch (N, {one})"


@dataclass(frozen=True)
class Parsed:
    inputs: torch.Tensor  # (rows, *shape)
    single: bool  # one example was sent: answer one
    binary: bool


def parse(body: bytes, content_type: str, spec: InputSpec) -> Parsed:
    if len(body) > spec.max_bytes:
        raise BadRequest(413, f"a body of {len(body)} bytes; at most {spec.max_bytes} (--max-body-bytes)")
    binary = content_type.split(";")[0].strip() == BINARY
    tensor = _binary(body, spec) if binary else _json(body, spec)
    if tuple(tensor.shape) == spec.shape:
        return Parsed(tensor.unsqueeze(0), True, binary)
    if tuple(tensor.shape[1:]) != spec.shape or tensor.shape[0] == 0:
        raise BadRequest(400, f"inputs of shape {tuple(tensor.shape)}: the model takes {spec.describe()}")
    if tensor.shape[0] > spec.max_rows:
        raise BadRequest(413, f"{tensor.shape[0]} examples in one request; at most {spec.max_rows} (--max-batch)")
    return Parsed(tensor, False, binary)


def _json(body: bytes, spec: InputSpec) -> torch.Tensor:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise BadRequest(400, f"malformed JSON: {type(exc).__name__}: {exc}") from None
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest(400, 'the body must be a JSON object with "inputs": a (nested) list of numbers')
    try:
        tensor = torch.tensor(document["inputs"])
    except (TypeError, ValueError, RuntimeError) as exc:  # RecursionError is a RuntimeError
        raise BadRequest(400, f'"inputs" must be a (nested) list of numbers of one shape: {exc}') from None
    if tensor.dtype == torch.bool or (tensor.is_floating_point() and not spec.dtype.is_floating_point):
        raise BadRequest(400, f'"inputs" holds {dtype_name(tensor.dtype)} values; the model takes '
                              f"{dtype_name(spec.dtype)}")
    return tensor.to(spec.dtype)


def _binary(body: bytes, spec: InputSpec) -> torch.Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise BadRequest(400, f"malformed safetensors body: {exc}") from None
    tensor = tensors.get("inputs")
    if tensor is None:
        raise BadRequest(400, f"the safetensors body has no tensor 'inputs' (it has {', '.join(tensors) or 'none'})")
    if tensor.dtype != spec.dtype:
        raise BadRequest(400, f"inputs of dtype {dtype_name(tensor.dtype)}; the model takes {dtype_name(spec.dtype)}")
    return tensor


def render(outputs: torch.Tensor, version: int, parsed: Parsed) -> tuple[bytes, str]:
    """The response body and its content type."""
    outputs = outputs[0] if parsed.single else outputs
    if parsed.binary:
        from safetensors.torch import save
        return save({"outputs": outputs.contiguous()}, metadata={"version": str(version)}), BINARY
    return json.dumps({"outputs": outputs.tolist(), "version": version}).encode(), "application/json"


__all__ = ["BINARY", "BadRequest", "InputSpec", "Parsed", "parse", "render"]
