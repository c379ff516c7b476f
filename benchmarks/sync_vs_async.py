"""sync vs async vs SSP: time to accuracy on a real data set, with and without a straggler.

    python benchmarks/sync_vs_async.py                    # the full run (RESULTS.md)
    python benchmarks/sync_vs_async.py --quick            # a smoke run, under 2 minutes
    python benchmarks/sync_vs_async.py --no-launcher      # without ps-launch (LocalCluster)

Every mode is its own job under ``ps-launch`` (``--no-launcher``: a ``LocalCluster`` and worker
processes started here, the same environment variables): ``--workers`` workers train a small
CNN on scikit-learn's handwritten digits (1797 8x8 images, 10 classes; a stratified 75/25
split, each worker a disjoint shard of the training part) for ``--steps`` steps each, with SGD
(momentum) applied on ``--servers`` servers. ``--lr`` is the learning rate of one worker's push;
sync mode, which averages the W pushes of a step into one update, uses W x ``--lr`` (the linear
scaling rule), so that in every mode each gradient moves the weights by the same amount.
Every ``--eval-every-s`` seconds rank 0 keeps a copy of the weights it has just pulled, and
evaluates the copies on the held-out 25% after training, so evaluation costs the run no time.
With ``--straggler F`` (F > 1) every mode runs a second time with the last worker sleeping
(F - 1) x its compute time each step.

Outputs: a table (time to ``--target-acc``, final accuracy, steps/s, updates/s), the summary
CSV and every raw record (JSON) under ``--out-dir``, and a PNG of held-out accuracy vs wall
time (top) and vs rank 0's steps (bottom), one panel without and one with the straggler.

steps/s = all workers' steps / wall time from the start barrier until the last worker is done.
updates/s = model updates the servers applied (summed ``server_stats()["applied"]`` divided by
the number of blocks, i.e. updates per block) / the same wall time. In sync mode one update
averages every worker's push; in async and SSP every push is an update.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from psframework import LocalCluster  # noqa: E402
from benchmarks._common import child_env, read_json_lines, tail  # noqa: E402
from psframework.procs import spawn, stop_all  # noqa: E402

WORKER = HERE / "_sva_worker.py"
DEFAULT_OUT = HERE / "out" / "sync_vs_async"
DEFAULT_PLOT = HERE / "sync_vs_async.png"


@dataclass(frozen=True)
class Mode:
    label: str  # "sync", "async", "ssp1", ...
    mode: str
    staleness: int


def parse_modes(text: str) -> list[Mode]:
    modes = []
    for label in (m.strip() for m in text.split(",") if m.strip()):
        if label in ("sync", "async"):
            modes.append(Mode(label, label, 0))
        elif label.startswith("ssp") and label[3:].isdigit():
            modes.append(Mode(label, "ssp", int(label[3:])))
        else:
            raise click.BadParameter(f"unknown mode {label!r}: use sync, async or sspK (K = staleness)")
    if not modes:
        raise click.BadParameter("no modes given")
    return modes


@dataclass
class Summary:
    panel: str
    straggler: float
    mode: str
    lr: float
    workers: int
    servers: int
    steps_per_worker: int
    wall_s: float
    time_to_target_s: Optional[float]
    step_at_target: Optional[int]
    target_acc: float
    final_acc: float
    final_test_loss: float
    steps_per_s: float
    updates_per_s: float
    updates: float


@dataclass(frozen=True)
class Job:
    mode: Mode
    straggler: float
    lr: float
    workers: int
    servers: int
    worker_args: tuple[str, ...]
    out_dir: Path
    log_dir: Path


def _worker_argv(job: Job) -> list[str]:
    return [sys.executable, str(WORKER), "--out-dir", str(job.out_dir), *job.worker_args]


def launcher_available() -> bool:
    return (ROOT / "launch" / "__main__.py").exists() and (ROOT / "launch" / "cli.py").exists()


def _watch(job: Job, procs: list[subprocess.Popen], steps_total: int, advance: Callable[[int], None],
           timeout: float, describe_failure: Callable[[], str]) -> None:
    """Wait for ``procs`` while reporting the workers' steps; raise with logs on failure."""
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        done = sum(sum(1 for r in read_json_lines(job.out_dir / f"worker-{k}.jsonl") if "loss" in r)
                   for k in range(job.workers))
        advance(done - seen)
        seen = done
        codes = [p.poll() for p in procs]
        failed = [c for c in codes if c not in (None, 0)]
        if failed:
            raise click.ClickException(f"{job.mode.label}: a process exited with code {failed[0]}\n"
                                       f"{describe_failure()}")
        if all(c == 0 for c in codes):
            break
        if time.monotonic() > deadline:
            raise click.ClickException(f"{job.mode.label}: not finished within {timeout} s\n{describe_failure()}")
        time.sleep(0.3)
    advance(steps_total - seen)


def run_with_launcher(job: Job, steps_total: int, advance, timeout: float) -> None:
    argv = [sys.executable, "-m", "psframework.launch", "-n", str(job.workers), "-s", str(job.servers),
            "--mode", job.mode.mode, "--staleness", str(job.mode.staleness), "--server-device", "cpu",
            "--log-dir", str(job.log_dir), "--", *_worker_argv(job)]
    out = open(job.log_dir / "ps-launch.log", "wb")
    proc = spawn(argv, child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=str(ROOT))
    try:
        def failure() -> str:
            return "\n".join([tail(job.log_dir / "ps-launch.log", 30)]
                             + [f"--- {p.name}:\n{tail(p, 15)}" for p in sorted(job.log_dir.glob("*.log"))
                                if p.name != "ps-launch.log"])

        _watch(job, [proc], steps_total, advance, timeout, failure)
    finally:
        stop_all([proc])
        out.close()


def run_without_launcher(job: Job, steps_total: int, advance, timeout: float) -> None:
    """The local stand-in for ps-launch: the same PS_* environment, no launcher process."""
    procs: list[subprocess.Popen] = []
    logs = []
    with LocalCluster(num_servers=job.servers, num_workers=job.workers, mode=job.mode.mode,
                      staleness=job.mode.staleness, server_device="cpu") as cluster:
        try:
            for rank in range(job.workers):
                log = open(job.log_dir / f"worker-{rank}.log", "wb")
                logs.append(log)
                env = {**child_env(), **cluster.env(), "PS_RANK": str(rank)}
                procs.append(spawn(_worker_argv(job), env, stdout=log, stderr=subprocess.STDOUT))

            def failure() -> str:
                return "\n".join([f"--- worker {r}:\n{tail(job.log_dir / f'worker-{r}.log', 15)}"
                                  for r in range(job.workers)]
                                 + [f"--- server 0:\n{cluster.output('server-0', 15)}"])

            _watch(job, procs, steps_total, advance, timeout, failure)
        finally:
            stop_all(procs)
            for log in logs:
                log.close()


def summarize(job: Job, records: list[dict], panel: str, target: float) -> Summary:
    final = next((r for r in records if r.get("final")), None)
    if final is None:
        raise click.ClickException(f"{job.mode.label}: rank 0 wrote no final record")
    evals = [r for r in records if r["rank"] == 0 and "acc" in r and not r.get("final")]
    hit = next((r for r in evals if r["acc"] >= target), None)
    wall = final["t"]
    updates = final["applied"] / max(1, final["blocks"])
    return Summary(
        panel=panel, straggler=job.straggler, mode=job.mode.label, lr=job.lr, workers=job.workers, servers=job.servers,
        steps_per_worker=final["steps"], wall_s=wall,
        time_to_target_s=hit["t"] if hit else None, step_at_target=hit["step"] if hit else None,
        target_acc=target, final_acc=final["acc"], final_test_loss=final["test_loss"],
        steps_per_s=final["workers"] * final["steps"] / wall, updates_per_s=updates / wall, updates=updates,
    )


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def print_table(console: Console, summaries: list[Summary]) -> None:
    target = summaries[0].target_acc
    s0 = summaries[0]
    table = Table(title=f"sync vs async vs SSP: {_count(s0.workers, 'worker')}, {_count(s0.servers, 'server')}",
                  caption="steps/s: all workers' steps per second; updates/s: model updates applied by the "
                          "servers per second")
    for name in ("panel", "mode", f"time to {target:.0%} (s)", "steps at target", "final acc", "wall (s)",
                 "steps/s", "updates/s"):
        table.add_column(name, justify="left" if name in ("panel", "mode") else "right", no_wrap=True)
    for s in summaries:
        table.add_row(s.panel, s.mode, "not reached" if s.time_to_target_s is None else f"{s.time_to_target_s:.2f}",
                      "—" if s.step_at_target is None else str(s.step_at_target), f"{s.final_acc:.3f}",
                      f"{s.wall_s:.1f}", f"{s.steps_per_s:.1f}", f"{s.updates_per_s:.1f}")
    console.print(table)


def plot(path: Path, series: dict[str, dict[str, list[dict]]], target: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(series)
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 7), squeeze=False, sharey=True)
    for col, panel in enumerate(panels):
        for mode, records in series[panel].items():
            evals = [r for r in records if r["rank"] == 0 and "acc" in r and not r.get("final")]
            line, = axes[0][col].plot([r["t"] for r in evals], [r["acc"] for r in evals], label=mode)
            axes[1][col].plot([r["step"] for r in evals], [r["acc"] for r in evals], color=line.get_color(),
                              label=mode)
        axes[0][col].set_title(panel)
        axes[0][col].set_xlabel("wall time (s)")
        axes[1][col].set_xlabel("rank 0's steps")
        for row in (0, 1):
            axes[row][col].axhline(target, color="grey", linestyle=":", linewidth=1)
            axes[row][col].grid(alpha=0.3)
            axes[row][0].set_ylabel("held-out accuracy")
        axes[0][col].legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def save_data(path: Path) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from _sva_worker import load_digits_split

    torch.save(load_digits_split(), path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--workers", type=int, default=4, show_default=True)
@click.option("--servers", type=int, default=2, show_default=True)
@click.option("--modes", default="sync,async,ssp1,ssp4", show_default=True, help="sync, async, sspK.")
@click.option("--steps", type=int, default=300, show_default=True, help="Training steps of every worker.")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--lr", type=float, default=0.0125, show_default=True,
              help="Per push; sync mode uses workers x lr on the averaged gradient.")
@click.option("--momentum", type=float, default=0.9, show_default=True)
@click.option("--straggler", type=float, default=4.0, show_default=True,
              help="Also run every mode with the last worker this many times slower to compute; 1: don't.")
@click.option("--target-acc", type=float, default=0.9, show_default=True)
@click.option("--eval-every-s", type=float, default=0.1, show_default=True,
              help="How often rank 0 keeps a copy of the weights (evaluated after training).")
@click.option("--no-launcher", is_flag=True, help="Start a LocalCluster and the workers here, not ps-launch.")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True, help="Summary CSV, raw records (JSON), logs.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_PLOT,
              show_default=True)
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per job.")
@click.option("--quick", is_flag=True, help="2 workers, 1 server, sync and async, 100 steps, lr 0.025.")
def main(workers: int, servers: int, modes: str, steps: int, batch_size: int, lr: float, momentum: float,
         straggler: float, target_acc: float, eval_every_s: float, no_launcher: bool, out_dir: Path,
         plot_path: Path, timeout: float, quick: bool) -> None:
    """Train on the digits data set in every mode; time to accuracy, with and without a straggler."""
    if quick:
        workers, servers, modes, steps, lr = 2, 1, "sync,async", 100, 0.025
    mode_list = parse_modes(modes)
    if workers < 1 or servers < 1 or steps < 1:
        raise click.BadParameter("--workers, --servers and --steps must be >= 1")
    if not no_launcher and not launcher_available():
        raise click.ClickException("ps-launch (the launch package) is not in this checkout; "
                                   "use --no-launcher for the local stand-in")
    run = run_without_launcher if no_launcher else run_with_launcher
    stragglers = [1.0] + ([straggler] if straggler > 1 else [])
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 120))
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries: list[Summary] = []
    series: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="ps-sva-") as tmp:
        data = Path(tmp) / "digits.pt"
        save_data(data)
        worker_args = ("--steps", str(steps), "--batch-size", str(batch_size), "--momentum", str(momentum),
                       "--eval-every-s", str(eval_every_s), "--data", str(data))
        per_job = workers * steps
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("starting", total=per_job * len(mode_list) * len(stragglers))
            for factor in stragglers:
                panel = "no straggler" if factor == 1 else f"straggler: rank {workers - 1} x{factor:g}"
                series[panel] = {}
                for mode in mode_list:
                    name = f"{mode.label}-straggler{factor:g}"
                    mode_lr = lr * workers if mode.mode == "sync" else lr
                    args = worker_args + ("--straggler", str(factor), "--lr", str(mode_lr))
                    job = Job(mode, factor, mode_lr, workers, servers, args,
                              Path(tmp) / name, out_dir / "logs" / name)
                    job.out_dir.mkdir()
                    job.log_dir.mkdir(parents=True, exist_ok=True)
                    progress.update(task, description=f"{panel}: {mode.label}")
                    run(job, per_job, lambda n: progress.advance(task, n) if n > 0 else None, timeout)
                    records = [r for k in range(workers) for r in read_json_lines(job.out_dir / f"worker-{k}.jsonl")]
                    series[panel][mode.label] = records
                    summaries.append(summarize(job, records, panel, target_acc))
    print_table(console, summaries)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(asdict(summaries[0])))
        writer.writeheader()
        writer.writerows(asdict(s) for s in summaries)
    with open(out_dir / "series.json", "w") as f:
        json.dump({"workers": workers, "servers": servers, "steps": steps, "target_acc": target_acc,
                   "launcher": not no_launcher, "series": series}, f)
    plot(plot_path, series, target_acc,
         f"digits CNN, {_count(workers, 'worker')}, {_count(servers, 'server')}, {steps} steps each "
         "(held-out accuracy, evaluated by rank 0)")
    console.print(f"wrote {out_dir / 'summary.csv'}, {out_dir / 'series.json'}, {plot_path}")


if __name__ == "__main__":
    main()
