"""Rows of an embedding table through the lanes' row areas, against the same rows over the socket.

    python benchmarks/rows.py                       # 1k, 8k and 24k distinct ids of dim 64; 1 and 2 servers
    python benchmarks/rows.py --rows 8192 --servers 1 --repeats 40

One worker (this process) and its servers (a ``LocalCluster`` on this host, async, SGD) share a
hashed table of dimension ``--dim`` whose rows exist already. A round is what one training step
does with the rows of one table: ``pull_rows`` of N distinct ids, then ``push_rows`` of their
gradients, each waited for. For every N and server count, clusters with rows through the lanes
(``PS_ROW_LANE_BYTES`` at its default, 8 MiB per area: up to 32k rows of dim 64 per server) and
with rows over the socket (``PS_ROW_LANE_BYTES=0``) alternate ``--rounds`` times; each measures
``--repeats`` rounds after ``--warmup``. The baseline is single-process torch doing the same to a
table in its own memory: ``index_select`` of the rows, ``index_add_`` of the gradients.

Prints medians (ms per round) and ratios as a Markdown table, and writes them to ``--out``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: the checkout is importable
    sys.path.insert(0, str(ROOT))

import psframework as ps  # noqa: E402

ID_SPACE = 1 << 40


def _ids(count: int, seed: int) -> torch.Tensor:
    return torch.unique(torch.randint(0, ID_SPACE, (count * 2,), generator=torch.Generator().manual_seed(seed)))[:count]


def measure_ps(servers: int, count: int, dim: int, repeats: int, warmup: int, lanes: bool) -> list[float]:
    """Seconds per round (pull then push of ``count`` rows) of a fresh job."""
    os.environ["PS_ROW_LANE_BYTES"] = str(8 << 20) if lanes else "0"  # read by ps.init
    with ps.LocalCluster(num_servers=servers, num_workers=1, mode="async") as cluster:
        with ps.init(scheduler=cluster.scheduler) as worker:
            table = ps.nn.Embedding(None, dim)
            worker.register({}, optimizer=ps.optim.SGD(lr=0.1), tables={"t": table},
                            sparse_optimizer=ps.optim.SGD(lr=0.01))
            ids, grads = _ids(count, 0), torch.full((count, dim), 0.5)
            times = []
            for k in range(warmup + repeats):
                start = time.perf_counter()
                worker.pull_rows("t", ids).wait(timeout=60)
                worker.push_rows("t", ids, grads).wait(timeout=60)
                times.append(time.perf_counter() - start)
            through = sum(s["lane_requests"] for s in worker.server_stats())
    expected = 2 * (warmup + repeats) * servers if lanes else 0
    if lanes and through < expected:
        raise click.ClickException(f"only {through} of {expected} row requests took a lane: is --rows too large "
                                   "for the row areas?")
    return times[warmup:]


def measure_torch(count: int, dim: int, repeats: int, warmup: int) -> list[float]:
    table = torch.randn(4 * count, dim)
    slots = torch.randperm(4 * count)[:count]
    grads = torch.full((count, dim), 0.5)
    times = []
    for _ in range(warmup + repeats):
        start = time.perf_counter()
        rows = table.index_select(0, slots)
        table.index_add_(0, slots, grads, alpha=-0.01)
        times.append(time.perf_counter() - start)
    del rows
    return times[warmup:]


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--rows", "rows_text", default="1024,8192,24576", show_default=True, help="Distinct ids per round.")
@click.option("--servers", "servers_text", default="1,2", show_default=True)
@click.option("--dim", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=30, show_default=True, help="Measured rounds per job.")
@click.option("--warmup", type=int, default=5, show_default=True)
@click.option("--rounds", type=int, default=2, show_default=True, help="Jobs of each kind, alternating.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=ROOT / "benchmarks" / "out" / "rows.json",
              show_default=True)
def main(rows_text: str, servers_text: str, dim: int, repeats: int, warmup: int, rounds: int, out: Path) -> None:
    """Pull and push of table rows: through the lanes, over the socket, and single-process torch."""
    counts = [int(x) for x in rows_text.split(",") if x.strip()]
    server_counts = [int(x) for x in servers_text.split(",") if x.strip()]
    results = []
    for count in counts:
        torch_ms = 1e3 * statistics.median(measure_torch(count, dim, repeats, warmup))
        for servers in server_counts:
            lane, socket = [], []
            for r in range(rounds):
                click.echo(f"{count} rows, {servers} server(s): round {r + 1}/{rounds} ...", err=True)
                lane += measure_ps(servers, count, dim, repeats, warmup, lanes=True)
                socket += measure_ps(servers, count, dim, repeats, warmup, lanes=False)
            results.append({"rows": count, "servers": servers, "dim": dim, "lane_ms": 1e3 * statistics.median(lane),
                            "socket_ms": 1e3 * statistics.median(socket), "torch_ms": torch_ms})
    lines = ["| rows | servers | lane ms | socket ms | socket / lane | torch ms | torch / lane |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['rows']:,} | {r['servers']} | {r['lane_ms']:.2f} | {r['socket_ms']:.2f} | "
                     f"{r['socket_ms'] / r['lane_ms']:.2f} | {r['torch_ms']:.3f} | {r['torch_ms'] / r['lane_ms']:.3f} |")
    click.echo("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": "python benchmarks/rows.py " + " ".join(sys.argv[1:]), "cores": os.cpu_count(),
                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
