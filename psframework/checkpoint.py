"""Checkpoint files: atomic writes, a manifest with checksums, and finding the newest complete one.

Layout of a checkpoint directory::

    D/step-00000007/server-0.pt      one file per server: its blocks, optimizer state and clocks
    D/step-00000007/server-1.pt
    D/step-00000007/manifest.json    written last: shard map, mode, sha256 of every file
    D/step-00000007-1/...            step 7 again, after the job went back to it (``directory_for``)

A checkpoint exists once its manifest does. Every file is written to a temporary name, fsynced
and renamed, so a crash in the middle leaves the previous checkpoint intact and loadable.
The servers and the scheduler must see the same directory (one host, or a shared file system).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from .errors import CheckpointError

FORMAT = 1
MANIFEST = "manifest.json"
_TAG = re.compile(r"^step-(\d{8,})(?:-(\d+))?$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def directory_for(root: Path, step: int) -> Path:
    """Where a new checkpoint of ``step`` goes: ``step-N``, or ``step-N-1``, ``step-N-2``... where a
    complete checkpoint already has that name (the first one after the job went back to step N,
    before any push, has step N too). A complete checkpoint is never rewritten in place: a rollback
    during the rewrite would find files that do not match its manifest. The later one is found first."""
    tag = tag_for(step)
    names = (f"{tag}-{n}" if n else tag for n in itertools.count())
    return next(root / name for name in names if not (root / name / MANIFEST).exists())


def write_atomic(path: Path, data: bytes) -> str:
    """Write ``data`` to ``path`` via a temporary file, fsync and rename; returns its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_shard(path: Path, payload: dict[str, Any]) -> tuple[str, int]:
    import torch  # here, not at the top: the scheduler imports this module and needs no torch

    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    return write_atomic(path, data), len(data)


def load_shard(path: Path, sha256: str) -> dict[str, Any]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint file {path}: {exc.strerror}") from None
    import torch

    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise CheckpointError(f"checkpoint file {path} is corrupt: sha256 {actual[:12]}... does not match the "
                              f"manifest's {sha256[:12]}...; use an older checkpoint or start afresh")
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> Path:
    path = directory / MANIFEST
    write_atomic(path, json.dumps({"format": FORMAT, **manifest}, indent=1, sort_keys=True).encode())
    return path


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no {MANIFEST}: the checkpoint is incomplete") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is unreadable: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path} has format {manifest.get('format')!r}; this psframework reads {FORMAT}")
    for name in manifest.get("files", {}):
        if not (directory / name).exists():
            raise CheckpointError(f"checkpoint {directory} lists {name}, which is missing")
    return manifest


def find_latest(root: Path) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest checkpoint under ``root`` whose manifest is complete, or None if there is none."""
    if not root.is_dir():
        return None
    candidates = sorted((int(m.group(1)), int(m.group(2) or 0), p) for p in root.iterdir()
                        if (m := _TAG.match(p.name)) and p.is_dir())
    for _, _, directory in reversed(candidates):
        try:
            return directory, read_manifest(directory)
        except CheckpointError:
            continue  # an interrupted write: fall back to the one before
    return None


def check_compatible(manifest: dict[str, Any], shard_map_wire: dict, mode: str, num_servers: int,
                     where: Path) -> None:
    if manifest.get("num_servers") != num_servers:
        raise CheckpointError(f"checkpoint {where} was taken with {manifest.get('num_servers')} servers; this job "
                              f"has {num_servers}. Resume with the same number of servers")
    if manifest.get("mode") != mode:
        raise CheckpointError(f"checkpoint {where} was taken in mode {manifest.get('mode')}; this job runs {mode}")
    saved = manifest.get("shard_map") or {}
    same_model = all(saved.get(key) == shard_map_wire.get(key) for key in ("tensors", "tables"))
    if same_model and saved.get("chunk_bytes") not in (None, shard_map_wire.get("chunk_bytes")):
        raise CheckpointError(f"checkpoint {where} holds blocks of {saved['chunk_bytes']} bytes, this job's are "
                              f"{shard_map_wire.get('chunk_bytes')} (the default block size depends on the servers' "
                              "device and on how the workers reach them): run the job with "
                              f"PS_CHUNK_BYTES={saved['chunk_bytes']} to resume it")
    if saved != shard_map_wire:
        raise CheckpointError(f"checkpoint {where} holds different tensors (or another chunk size) than the ones "
                              "registered now; register the same model with the same PS_CHUNK_BYTES")
