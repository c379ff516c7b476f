"""Load: many workers push asynchronously for a while; every push must be applied exactly once.

    python benchmarks/load.py --workers 8 --servers 2 --seconds 60

Starts a LocalCluster (async mode, token authentication) and worker processes that push as fast
as they can. Meanwhile it samples the servers' resident memory. At the end it compares the
servers' count of applied updates with the number of pushes the workers sent, and reports
updates/s and memory over time (a table, JSON under benchmarks/out/, and a PNG plot).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def _rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def worker_main(out: str, seconds: float, size_mb: float) -> None:
    import torch

    import psframework as ps

    with ps.init() as worker:
        numel = int(size_mb * 2**20 / 4)
        params = {"emb": torch.zeros(numel), "bias": torch.zeros(64)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1e-6))
        blocks = len(worker.shard_map.blocks)
        grads = {k: torch.ones_like(v) for k, v in params.items()}
        worker.barrier()
        sent, window = 0, []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            window.append(worker.push(grads))
            sent += 1
            if len(window) >= 4:  # a few pushes in flight, as an async trainer would have
                window.pop(0).wait(timeout=60)
        for future in window:
            future.wait(timeout=60)
        worker.barrier()
        stats = worker.server_stats() if worker.rank == 0 else None
        worker.barrier()
        Path(out).write_text(json.dumps({"rank": worker.rank, "pushes": sent, "blocks": blocks, "stats": stats}))


@click.command()
@click.option("--workers", default=8, show_default=True)
@click.option("--servers", default=2, show_default=True)
@click.option("--seconds", default=60.0, show_default=True)
@click.option("--size-mb", default=1.0, show_default=True, help="model size pushed by every push")
@click.option("--out", default=str(ROOT / "benchmarks" / "out" / "load.json"), show_default=True)
@click.option("--plot", default=str(ROOT / "benchmarks" / "load_memory.png"), show_default=True)
@click.option("--worker", "worker_out", hidden=True, default=None)
def main(workers: int, servers: int, seconds: float, size_mb: float, out: str, plot: str,
         worker_out: str) -> None:
    if worker_out:
        worker_main(worker_out, seconds, size_mb)
        return
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    import psframework as ps

    console = Console()
    out_dir = Path(out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    with ps.LocalCluster(num_servers=servers, num_workers=workers, mode="async", auth="token") as cluster:
        env = {**os.environ, **cluster.env(), "PYTHONPATH": str(ROOT)}
        results = [out_dir / f"load-worker-{r}.json" for r in range(workers)]
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(results[r]), "--seconds", str(seconds),
                                   "--size-mb", str(size_mb)], env={**env, "PS_RANK": str(r)})
                 for r in range(workers)]
        server_pids = {name: p.pid for name, p in cluster.processes().items() if name.startswith("server")}
        samples, start = [], time.monotonic()
        try:
            with Progress(console=console) as progress:
                task = progress.add_task(f"{workers} workers pushing", total=seconds)
                while any(p.poll() is None for p in procs):
                    now = time.monotonic() - start
                    samples.append({"t": now, **{n: _rss_mib(pid) for n, pid in server_pids.items()}})
                    progress.update(task, completed=min(now, seconds))
                    time.sleep(0.5)
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
        elapsed = time.monotonic() - start
    if any(codes):
        raise SystemExit(f"workers failed: exit codes {codes}")
    reports = [json.loads(r.read_text()) for r in results]
    sent = sum(r["pushes"] for r in reports)
    blocks = reports[0]["blocks"]
    stats = next(r["stats"] for r in reports if r["stats"])
    applied = sum(s["applied"] for s in stats)
    received = sum(s["pushes"] for s in stats)
    summary = {"workers": workers, "servers": servers, "seconds": seconds, "size_mb": size_mb,
               "pushes_sent": sent, "blocks_per_push": blocks, "block_updates_expected": sent * blocks,
               "block_pushes_received": received, "block_updates_applied": applied,
               "pushes_per_s": sent / seconds, "block_updates_per_s": applied / seconds,
               "gb_per_s_pushed": sent * size_mb / 1024 / seconds, "elapsed": elapsed, "memory": samples}
    Path(out).write_text(json.dumps(summary, indent=1))
    table = Table(title=f"load: {workers} async workers, {servers} servers, {seconds:g} s, {size_mb:g} MiB pushes")
    for column in ("pushes sent", "block updates expected", "applied", "equal", "pushes/s", "updates/s",
                   "GB/s pushed", "server RSS MiB at 25% → end (peak)"):
        table.add_column(column)
    warm = next((s for s in samples if s["t"] >= elapsed / 4), samples[-1])  # after start-up and imports
    rss = ", ".join(f"{warm[n]:.0f} → {samples[-1][n]:.0f} ({max(s[n] for s in samples):.0f})" for n in server_pids)
    table.add_row(str(sent), str(sent * blocks), str(applied), str(applied == sent * blocks),
                  f"{sent / seconds:.0f}", f"{applied / seconds:.0f}", f"{sent * size_mb / 1024 / seconds:.2f}", rss)
    console.print(table)
    _plot(samples, list(server_pids), plot, summary)
    console.print(f"raw: {out}\nplot: {plot}")
    if applied != sent * blocks:
        raise SystemExit(f"LOST OR DUPLICATED UPDATES: expected {sent * blocks}, applied {applied}")


def _plot(samples: list[dict], names: list[str], path: str, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name in names:
        ax.plot([s["t"] for s in samples], [s[name] for s in samples], label=name)
    ax.set_xlabel("seconds")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"server memory under load: {summary['workers']} async workers, "
                 f"{summary['block_updates_per_s']:.0f} updates/s")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
