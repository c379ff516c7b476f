"""A server's sync step on the CPU: several workers' gradients summed whole and then stepped, against
summed and stepped a tile at a time (``optim.ShardOptimizer``, issue 20).

    python benchmarks/tiles.py                       # 64 MiB in 4 MiB blocks, 2 workers, SGD; ~1 min
    python benchmarks/tiles.py --workers 4 --momentum 0.9 --tiles 0.25,1,4

One thread, as a server runs. The model is ``--mib`` of float32 cut into ``--block-mib`` blocks, as
the shard map cuts it; each block has its own sum buffer, as each of a server's blocks has its own
scratch, and each worker's gradients sit in a buffer of their own, as lane slots do. "whole" is
what a server did before tiles: add the workers' gradients of a block into its scratch, then one
fused SGD step of the block. "tiled, T MiB" hands the optimizer the unsummed gradients and it sums
and steps T MiB at a time (``optim.TILE_BYTES``). Every setup checks that its values have the
same bits as "whole" after the same steps. Prints medians of ``--repeats`` steps (ms per step of
the whole model) as a Markdown table.
"""

from __future__ import annotations

import statistics
import time

import click
import torch

from psframework import optim


def _model(mib: float, block_mib: float, workers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    numel, block = int(mib * 2**20) // 4, int(block_mib * 2**20) // 4
    sizes = [min(block, numel - start) for start in range(0, numel, block)]
    params = [torch.randn(n, generator=g) for n in sizes]
    grads = [[torch.randn(n, generator=g) for n in sizes] for _ in range(workers)]
    return params, grads


def _time_setup(tile_mib: float, params, grads, spec, repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Median ms of a step over all blocks; tile_mib 0: summed whole into per-block scratch first."""
    shard = optim.ShardOptimizer(spec, [p.clone() for p in params])
    scratch = [torch.empty_like(p) for p in params]
    workers = len(grads)
    if tile_mib:
        optim.TILE_BYTES = int(tile_mib * 2**20)

    def step() -> None:
        if tile_mib and all(shard.tiles(i) for i in range(len(params))):
            shard.step({i: [g[i] for g in grads] for i in range(len(params))}, scale=1 / workers)
            return
        for i in range(len(params)):
            torch.add(grads[0][i], grads[1][i], out=scratch[i])
            for more in grads[2:]:
                scratch[i].add_(more[i])
        shard.step(dict(enumerate(scratch)), scale=1 / workers)

    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:]) * 1e3, shard.params


@click.command()
@click.option("--mib", default=64.0, show_default=True, help="Model size.")
@click.option("--block-mib", default=4.0, show_default=True, help="Block size (the shard map's chunk).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(2, 64))
@click.option("--momentum", default=0.0, show_default=True)
@click.option("--tiles", default="0.0625,0.25,1,4", show_default=True, help="Tile sizes in MiB.")
@click.option("--repeats", default=15, show_default=True)
def main(mib: float, block_mib: float, workers: int, momentum: float, tiles: str, repeats: int) -> None:
    torch.set_num_threads(1)
    spec = optim.SGD(lr=0.01, momentum=momentum)
    params, grads = _model(mib, block_mib, workers)
    default = optim.TILE_BYTES
    rows = []
    whole_ms, want = _time_setup(0, params, grads, spec, repeats)
    rows.append(("whole", whole_ms, True))
    for tile in [float(t) for t in tiles.split(",")]:
        ms, got = _time_setup(tile, params, grads, spec, repeats)
        rows.append((f"tiled, {tile:g} MiB", ms, all(torch.equal(a, b) for a, b in zip(got, want))))
        optim.TILE_BYTES = default
        click.echo(f"  {rows[-1][0]}: {ms:.1f} ms", err=True)
    click.echo(f"\n{mib:g} MiB in {block_mib:g} MiB blocks, {workers} workers, SGD momentum {momentum:g}, "
               f"median of {repeats} steps, one thread\n")
    click.echo("| setup | ms per step | vs whole | same bits as whole |\n|---|---:|---:|---|")
    for name, ms, same in rows:
        click.echo(f"| {name} | {ms:.1f} | {whole_ms / ms:.2f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
