"""One file from a checkpoint: ``python -m psframework.export CHECKPOINT_DIR --out model.safetensors``.

A checkpoint is one shard file per server (``checkpoint.py``); nothing else can read it. This
assembles the shards, checked against the manifest's hashes, into:

- every registered dense tensor under its own name and shape (``head.weight``), so the file loads
  into the original model with ``load_state_dict``;
- every embedding table as the rows it holds, ``{table}.ids`` (int64, sorted) and ``{table}.rows``;
  a table with ``num_embeddings`` also as ``{table}.weight`` (rows never created hold their initial
  values, as a lookup would answer), which loads into a ``torch.nn.Embedding(Bag)`` of that name;
- with ``optimizer_state``: ``optimizer.{tensor}.{state}`` (``optimizer.head.weight.exp_avg``) and
  ``{table}.state.{slot}`` for the rows.

``.safetensors`` (the extra ``export``) or ``.pt`` (a torch state dict), chosen by the suffix.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import click
import torch

from . import checkpoint, rowhash
from .errors import CheckpointError, ConfigError, PSError
from .sharding import ShardMap

SUFFIXES = (".safetensors", ".pt")


@dataclass(frozen=True)
class Exported:
    """What ``export`` wrote."""

    path: Path
    checkpoint: Path
    step: int
    tensors: int
    tables: int
    rows: int
    nbytes: int


def find_checkpoint(directory: Path) -> Path:
    """``directory`` itself if it is a complete checkpoint, else the newest complete one under it."""
    directory = Path(directory)
    if (directory / checkpoint.MANIFEST).exists():
        return directory
    latest = checkpoint.find_latest(directory)
    if latest is None:
        raise CheckpointError(f"no complete checkpoint in or under {directory}: give a checkpoint directory "
                              "(one with a manifest.json) or the job's checkpoint root")
    return latest[0]


def assemble(directory: Path, *, optimizer_state: bool = False, table_weights: bool = True,
             progress: Optional[Callable[[str], None]] = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of the checkpoint in or under ``directory`` by name, and metadata about it
    (``step``, ``mode``, ``checkpoint``: strings). ``progress(file)`` after each shard file is read."""
    where = find_checkpoint(directory)
    manifest = checkpoint.read_manifest(where)
    try:
        shard_map = ShardMap.from_wire(manifest["shard_map"])
        files = {name: entry["sha256"] for name, entry in manifest["files"].items()}
    except (KeyError, TypeError, PSError) as exc:
        raise CheckpointError(f"{where / checkpoint.MANIFEST} does not describe the job's tensors: {exc}") from None
    shards = []
    for rank in range(shard_map.num_servers):
        name = f"server-{rank}.pt"
        if name not in files:
            raise CheckpointError(f"checkpoint {where} has no file for server {rank} ({name}) in its manifest")
        shards.append(checkpoint.load_shard(where / name, files[name]))
        if progress is not None:
            progress(name)
    tensors = _dense(shard_map, shards, where)
    if optimizer_state:
        tensors.update(_dense_optimizer_state(shard_map, shards))
    for spec in shard_map.tables:
        tensors.update(_table(spec, shards, optimizer_state, table_weights))
    meta = {"step": str(manifest.get("step", "")), "mode": str(manifest.get("mode", "")),
            "checkpoint": str(where), "tables": json.dumps([spec.name for spec in shard_map.tables])}
    return tensors, meta


def export(directory: Path, out: Path, *, optimizer_state: bool = False, table_weights: bool = True,
           progress: Optional[Callable[[str], None]] = None) -> Exported:
    """Write the checkpoint in or under ``directory`` to ``out`` (see the module's docstring)."""
    out = _checked_out(out)
    tensors, meta = assemble(directory, optimizer_state=optimizer_state, table_weights=table_weights,
                             progress=progress)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.contiguous() for name, t in tensors.items()}
    if out.suffix == ".safetensors":
        _save_safetensors(tensors, meta, out)
    else:
        torch.save(tensors, out)
    table_names = json.loads(meta["tables"])
    return Exported(path=out, checkpoint=Path(meta["checkpoint"]), step=int(meta["step"] or 0),
                    tensors=sum(1 for name in tensors if _owner(name, table_names) is None
                                and not name.startswith("optimizer.")),
                    tables=len(table_names),
                    rows=sum(tensors[f"{t}.ids"].numel() for t in table_names),
                    nbytes=sum(t.numel() * t.element_size() for t in tensors.values()))


def _checked_out(out: Path) -> Path:
    out = Path(out)
    if out.suffix not in SUFFIXES:
        raise ConfigError(f"--out {out}: the file name must end in {' or '.join(SUFFIXES)}")
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], meta: dict[str, str], out: Path) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("writing .safetensors needs the safetensors package: pip install 'psframework[export]', "
                          "or write a .pt file") from None
    save_file(tensors, str(out), metadata=meta)


def _owner(name: str, tables: list[str]) -> Optional[str]:
    return next((t for t in tables if name.startswith(f"{t}.")), None)


def _dense(shard_map: ShardMap, shards: list[dict], where: Path) -> dict[str, torch.Tensor]:
    flat = {spec.name: torch.empty(spec.numel, dtype=getattr(torch, spec.dtype)) for spec in shard_map.tensors}
    for block in shard_map.blocks:
        try:
            saved = shards[block.server]["blocks"][block.block_id]["params"]
        except (KeyError, IndexError):
            raise CheckpointError(f"checkpoint {where}: server-{block.server}.pt lacks block {block.block_id} "
                                  "that the manifest's shard map places there") from None
        for seg, values in zip(block.segments, saved):
            flat[seg.key][seg.offset:seg.offset + seg.numel] = values.reshape(-1)
    return {spec.name: flat[spec.name].reshape(spec.shape) for spec in shard_map.tensors}


def _dense_optimizer_state(shard_map: ShardMap, shards: list[dict]) -> dict[str, torch.Tensor]:
    """The servers' optimizer state by tensor: a server's optimizer holds one parameter per segment
    of its blocks, in the order of ``blocks_of_server`` (``DenseStore``)."""
    pieces: dict[tuple[str, str], dict[int, torch.Tensor]] = {}
    scalars: dict[tuple[str, str], torch.Tensor] = {}
    for rank in range(shard_map.num_servers):
        state = shards[rank]["optimizer"].get("state", {})
        index = 0
        for block in shard_map.blocks_of_server(rank):
            for seg in block.segments:
                for key, value in state.get(index, {}).items():
                    if not torch.is_tensor(value):
                        continue
                    if value.numel() == seg.numel and value.dim() > 0:
                        pieces.setdefault((seg.key, key), {})[seg.offset] = value.reshape(-1)
                    else:  # a per-parameter scalar such as Adam's step: the same for every segment
                        scalars[(seg.key, key)] = value.reshape(())
                index += 1
    specs = {spec.name: spec for spec in shard_map.tensors}
    out = {f"optimizer.{name}.{key}": value.clone() for (name, key), value in scalars.items()}
    for (name, key), parts in pieces.items():
        out[f"optimizer.{name}.{key}"] = torch.cat([parts[o] for o in sorted(parts)]).reshape(specs[name].shape)
    return out


def _table(spec, shards: list[dict], optimizer_state: bool, table_weights: bool) -> dict[str, torch.Tensor]:
    held = [shard["rows"]["tables"][spec.name] for shard in shards
            if spec.name in shard.get("rows", {}).get("tables", {})]
    ids = torch.cat([h["ids"] for h in held]) if held else torch.empty(0, dtype=torch.int64)
    order = torch.argsort(ids)
    rows = (torch.cat([h["values"] for h in held]) if held else torch.empty(0, spec.dim))[order]
    out = {f"{spec.name}.ids": ids[order], f"{spec.name}.rows": rows}
    if optimizer_state and held:
        for slot in held[0]["state"]:
            out[f"{spec.name}.state.{slot}"] = torch.cat([h["state"][slot] for h in held])[order]
    if table_weights and spec.num_embeddings is not None:
        weight = rowhash.initial_rows(spec, torch.arange(spec.num_embeddings, dtype=torch.int64)).to(rows.dtype)
        weight[out[f"{spec.name}.ids"]] = rows
        out[f"{spec.name}.weight"] = weight
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("checkpoint_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write: NAME.safetensors or NAME.pt (a torch state dict).")
@click.option("--optimizer-state", is_flag=True, help="Also write the servers' optimizer state.")
@click.option("--table-weights/--no-table-weights", default=True, show_default=True,
              help="Write tables with num_embeddings also as a full TABLE.weight.")
def main(checkpoint_dir: Path, out: Path, optimizer_state: bool, table_weights: bool) -> None:
    """Assemble the checkpoint in (or newest under) CHECKPOINT_DIR into one file."""
    try:
        _checked_out(out)
        where = find_checkpoint(checkpoint_dir)
        servers = checkpoint.read_manifest(where).get("num_servers", 0)
        with click.progressbar(length=int(servers), label=f"reading {where.name}", file=sys.stderr) as bar:
            done = export(where, out, optimizer_state=optimizer_state, table_weights=table_weights,
                          progress=lambda _: bar.update(1))
    except PSError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"wrote {done.path}: {done.tensors} tensors and {done.tables} tables ({done.rows} rows), "
               f"{done.nbytes / 2**20:.1f} MiB, from {done.checkpoint} (step {done.step})")


def load(path: Path) -> dict[str, Any]:
    """The tensors of a file written by ``export`` (either format), by name."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    return torch.load(path, weights_only=True, map_location="cpu")


if __name__ == "__main__":  # pragma: no cover
    main()
