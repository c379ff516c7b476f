"""Embedding tables on the servers: a DLRM-style click model, psframework against torch and DDP.

    python benchmarks/embeddings.py                 # the whole matrix (about 15 min on 2 cores)
    python benchmarks/embeddings.py --quick         # smoke run: torch, ps sync 1s/1w, ps async 2s/2w (< 1 min)
    python benchmarks/embeddings.py --device cuda   # workers' model and rows on the GPU; servers on the CPU

The model and the data are examples/train_ctr.py's: 8 tables of dimension 64 (4 fixed with
``--fixed-rows`` rows, 4 hashed over a 10^12 id space), 13 dense features, bottom and top MLPs,
dot interactions, batch 2048, ids from a Zipf law (alpha 1.05), labels from a planted model, so
the best possible AUC (the planted probabilities' own, on the same held-out set) is known.

Runs, one after the other, each with fresh processes (``_embeddings_worker.py``):

* ``torch``: single-process torch, ``nn.EmbeddingBag(sparse=True)`` + ``torch.optim.SparseAdam``
  for the tables, ``Adam`` for the MLPs: the baseline every ratio is taken against;
* ``ddp``: 2 processes of DDP over gloo, the tables replicated in each (where they fit in memory);
* ``ps``: ``ps-launch -n W -s S --mode M --server-device cpu``, for every S in ``--servers``, W in
  ``--workers`` and M in ``--modes``: the tables only on the servers;
* for each other size in ``--sizes``: torch and ps sync 1 server/1 worker with fixed tables of that
  many rows, to show what grows with the tables and what does not.

Threads: single-process torch runs with torch's default (every core); the processes of the other
runs share the cores (``--threads`` of a worker or DDP rank: cores // processes of the run).

Every variant starts from the same values (the MLPs from one seed, every row at psframework's
initial value) and sees the same batches (a worker makes its share of each), so at equal samples
sync training differs from torch only by rounding.

Measured: samples/s = samples of all workers / the slowest worker's training seconds (which leave
out making the synthetic batches and the evaluations); held-out AUC after every 1/``--evals`` of the
run (the last on ``--final-eval-samples``, the others on ``--eval-samples``); peak RSS of every
process (workers: their own ``ru_maxrss``; servers, scheduler, ps-launch: ``VmHWM`` from /proc,
sampled every 0.25 s); rows pulled + pushed per second per server (each step pulls the distinct ids
of each table and pushes one gradient row for each, counted by the workers per server; for torch
the rows its own step reads and writes).

Outputs under ``--out``: ``embeddings.json`` (every run, its evaluations, memory and raw final
records), ``results.md`` (the tables as Markdown), each run's records and logs under ``runs/``; the
plot of AUC over samples and over training time at ``--plot``. Exit code 1 if a run failed.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/ is importable
    sys.path.insert(0, str(ROOT))

from benchmarks._common import child_env, free_port, read_json_lines, tail  # noqa: E402
from benchmarks._embeddings_report import Report, best_auc, summarize  # noqa: E402
from benchmarks._embeddings_watch import MemoryWatch, mem_available_bytes  # noqa: E402
from psframework.procs import exit_description, spawn, stop_all  # noqa: E402

WORKER = HERE / "_embeddings_worker.py"
DEFAULT_OUT = HERE / "out" / "embeddings"
DEFAULT_PLOT = HERE / "embeddings.png"
TICK = 0.25


@dataclass(frozen=True)
class Config:
    """One run of the matrix."""

    variant: str          # torch | ddp | ps
    fixed_rows: int
    servers: int = 0
    workers: int = 1
    mode: str = ""

    @property
    def label(self) -> str:
        name = {"torch": "torch", "ddp": f"DDP x{self.workers}"}.get(
            self.variant, f"ps {self.mode} {self.servers}s/{self.workers}w")
        return name

    @property
    def slug(self) -> str:
        return f"{self.variant}-{self.mode or 'x'}-s{self.servers}-w{self.workers}-r{self.fixed_rows}"


def matrix(fixed_rows: int, sizes: list[int], servers: list[int], workers: list[int], modes: list[str],
           ddp: bool) -> list[Config]:
    runs = [Config("torch", fixed_rows)] + ([Config("ddp", fixed_rows, workers=2)] if ddp else [])
    runs += [Config("ps", fixed_rows, s, w, m) for m in modes for s in servers for w in workers]
    for rows in sizes:
        if rows != fixed_rows:
            runs += [Config("torch", rows), Config("ps", rows, 1, 1, "sync")]
    return runs


def threads(cfg: Config) -> int:
    """torch threads of a training process: single-process torch takes torch's default (every core);
    otherwise the cores are shared among the run's processes (a server picks its own, 1 on 2 cores)."""
    if cfg.variant == "torch":
        return 0
    return max(1, (os.cpu_count() or 1) // (cfg.workers + cfg.servers))


def torch_bytes(cfg: Config, samples: int) -> int:
    """What one torch process's tables need at most: weights and SparseAdam's two moments, fixed
    tables whole, hashed ones one row per id of the run (at most one per id drawn)."""
    from benchmarks._embeddings_worker import ctr

    rows = sum(f.rows if f.rows else samples * f.bag for f in ctr.features(cfg.fixed_rows))
    return rows * ctr.DIM * 4 * 3


@dataclass
class Outcome:
    status: str                         # ok | failed | skipped
    records: list[dict]
    memory: dict[str, float]            # process name -> peak RSS MiB (/proc)
    wall_s: float
    reason: str = ""
    left: list[str] = field(default_factory=list)  # processes of the run still alive after it


class Runner:
    """Starts one run's processes, follows their progress, samples their memory, stops them."""

    def __init__(self, out: Path, worker_args: list[str], steps: int, timeout: float, ps_env: tuple[str, ...] = ()):
        self.out, self.worker_args, self.steps, self.timeout = out, worker_args, steps, timeout
        self.ps_env = [arg for variable in ps_env for arg in ("-x", variable)]  # ps-launch -x NAME=VALUE

    def argv(self, cfg: Config, run_dir: Path) -> list[tuple[str, list[str]]]:
        worker = [sys.executable, str(WORKER)]
        common = ["--out", str(run_dir), "--fixed-rows", str(cfg.fixed_rows), "--threads", str(threads(cfg)),
                  *self.worker_args]
        if cfg.variant == "torch":
            return [("torch", worker + ["torch", *common])]
        if cfg.variant == "ddp":
            port = str(free_port())
            return [(f"ddp rank {r}", worker + ["ddp", "--rank", str(r), "--world", str(cfg.workers), "--port", port,
                                               *common]) for r in range(cfg.workers)]
        launch = [sys.executable, "-m", "psframework.launch", "-n", str(cfg.workers), "-s", str(cfg.servers),
                  "--mode", cfg.mode, "--server-device", "cpu", "--log-dir", str(run_dir / "logs"), *self.ps_env, "--"]
        return [("ps-launch", launch + worker + ["ps", *common])]

    def run(self, cfg: Config, advance: Callable[[int], None]) -> Outcome:
        run_dir = self.out / "runs" / cfg.slug
        run_dir.mkdir(parents=True, exist_ok=True)
        for old in run_dir.glob("*.jsonl"):
            old.unlink()
        procs, logs = {}, []
        watch = MemoryWatch()
        start = time.monotonic()
        try:
            for name, argv in self.argv(cfg, run_dir):
                log = open(run_dir / f"{name.replace(' ', '-')}.log", "wb")
                logs.append(log)
                (run_dir / f"{name.replace(' ', '-')}.cmd").write_text(shlex.join(argv) + "\n")
                procs[name] = spawn(argv, child_env(), stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))
            failure = self._follow(cfg, run_dir, procs, watch, advance, start)
        finally:
            stop_all(list(procs.values()))
            for log in logs:
                log.close()
        left = self._left_behind(watch)
        if left:  # ps-launch ends every process of its job: one still running is a failure of the run
            failure = (failure or "") + f"processes left running after the run (now killed): {', '.join(left)}"
        wall = time.monotonic() - start
        if failure:
            logs = sorted(run_dir.glob("*.log")) + sorted((run_dir / "logs").glob("*.log"))
            detail = "\n".join(f"--- {p.name}:\n{tail(p, 12)}" for p in logs)
            return Outcome("failed", [], watch.peaks(), wall, f"{failure}\n{detail}", left)
        records = [r for path in sorted(run_dir.glob(f"{cfg.variant}-*.jsonl")) for r in read_json_lines(path)]
        return Outcome("ok", records, watch.peaks(), wall)

    def _follow(self, cfg: Config, run_dir: Path, procs: dict, watch: MemoryWatch, advance, start: float
                ) -> Optional[str]:
        """Wait for the run's processes, reporting rank 0's steps; why it failed, or None."""
        seen = 0
        while True:
            watch.sample([p.pid for p in procs.values()])
            done = sum(1 for r in read_json_lines(run_dir / f"{cfg.variant}-0.jsonl") if r["kind"] == "step")
            advance(done - seen)
            seen = done
            codes = {name: p.poll() for name, p in procs.items()}
            failed = {name: exit_description(c) for name, c in codes.items() if c not in (None, 0)}
            if failed:
                return "; ".join(f"{name}: {how}" for name, how in failed.items())
            if all(c == 0 for c in codes.values()):
                advance(self.steps - seen)
                return None
            if time.monotonic() - start > self.timeout:
                return f"not finished within {self.timeout:.0f} s"
            time.sleep(TICK)

    @staticmethod
    def _left_behind(watch: MemoryWatch, grace: float = 5.0) -> list[str]:
        deadline = time.monotonic() + grace
        while watch.left() and time.monotonic() < deadline:
            time.sleep(0.1)
        left = watch.left()
        for pid in watch.left_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _ints(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected positive numbers, got {text!r}")
    return values


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--samples", type=int, default=300_000, show_default=True, help="Training samples per run (all workers).")
@click.option("--batch-size", type=int, default=2048, show_default=True)
@click.option("--fixed-rows", type=int, default=1_000_000, show_default=True, help="Rows of each fixed table.")
@click.option("--sizes", default="100000,1000000,10000000", show_default=True,
              help="Fixed-table sizes for the memory runs (torch and ps sync 1s/1w each).")
@click.option("--servers", "servers_text", default="1,2,4", show_default=True)
@click.option("--workers", "workers_text", default="1,2", show_default=True)
@click.option("--modes", default="sync,async", show_default=True)
@click.option("--no-ddp", is_flag=True, help="Leave DDP out.")
@click.option("--evals", type=int, default=6, show_default=True, help="Held-out evaluations per run.")
@click.option("--eval-samples", type=int, default=8192, show_default=True)
@click.option("--final-eval-samples", type=int, default=65536, show_default=True)
@click.option("--lr", type=float, default=3e-3, show_default=True, help="Adam, for the MLPs.")
@click.option("--sparse-lr", type=float, default=0.03, show_default=True, help="SparseAdam, for the tables.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="Where the workers (and torch, DDP) keep the model and the rows of a batch; servers stay on CPU.")
@click.option("--no-prefetch", is_flag=True, help="ps workers do not prefetch the next batch's rows.")
@click.option("--timeout", type=float, default=900.0, show_default=True, help="Seconds per run.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_OUT,
              show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_PLOT,
              show_default=True)
@click.option("--ps-env", multiple=True, metavar="NAME=VALUE",
              help="A variable for the processes of the ps runs (ps-launch -x), e.g. PS_ROW_LANE_BYTES=0; repeatable.")
@click.option("--quick", is_flag=True, help="Smoke run: 12k samples, fixed tables of 10^5 rows, torch, ps sync "
                                            "1s/1w and ps async 2s/2w, small evaluations.")
def main(samples: int, batch_size: int, fixed_rows: int, sizes: str, servers_text: str, workers_text: str, modes: str,
         no_ddp: bool, evals: int, eval_samples: int, final_eval_samples: int, lr: float, sparse_lr: float,
         device: str, no_prefetch: bool, timeout: float, out_dir: Path, plot_path: Path, ps_env: tuple[str, ...],
         quick: bool) -> None:
    """Train the click model in every configuration; throughput, AUC and memory against torch."""
    import torch

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if device == "cuda" and not torch.cuda.is_available():
        raise click.ClickException(f"--device cuda: torch sees no CUDA device on this machine (torch "
                                   f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); use --device cpu")
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    if not mode_list or any(m not in ("sync", "async", "ssp") for m in mode_list):
        raise click.BadParameter(f"--modes takes sync, async, ssp; got {modes!r}")
    if quick:
        samples, fixed_rows, evals, eval_samples, final_eval_samples = 12_288, 100_000, 2, 4096, 8192
        runs = [Config("torch", fixed_rows), Config("ps", fixed_rows, 1, 1, "sync"),
                Config("ps", fixed_rows, 2, 2, "async")]
    else:
        runs = matrix(fixed_rows, _ints(sizes), _ints(servers_text), _ints(workers_text), mode_list, not no_ddp)
    steps = max(1, samples // batch_size)
    worker_args = ["--samples", str(samples), "--batch-size", str(batch_size), "--evals", str(evals),
                   "--eval-samples", str(eval_samples), "--final-eval-samples", str(final_eval_samples),
                   "--lr", str(lr), "--sparse-lr", str(sparse_lr), "--device", device] + \
                  (["--no-prefetch"] if no_prefetch else [])
    console = Console() if sys.stdout.isatty() else Console(width=160)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any("=" not in variable for variable in ps_env):
        raise click.BadParameter(f"--ps-env takes NAME=VALUE, got {ps_env!r}")
    runner = Runner(out_dir, worker_args, steps, timeout, ps_env)
    command = "python benchmarks/embeddings.py " + shlex.join(sys.argv[1:])
    settings = {"commit": _git("rev-parse", "--short", "HEAD"),
                "uncommitted_framework_files": _git("status", "--short", "--", "psframework", "launch").splitlines(),
                "cores": os.cpu_count(), "samples": steps * batch_size, "batch_size": batch_size, "fixed_rows": fixed_rows, "evals": evals,
                "eval_samples": eval_samples, "final_eval_samples": final_eval_samples, "lr": lr,
                "sparse_lr": sparse_lr, "device": device, "prefetch": not no_prefetch, "ps_env": list(ps_env)}
    report = Report(command, settings, {rows: best_auc(rows, batch_size, final_eval_samples)
                                        for rows in sorted({c.fixed_rows for c in runs})})
    available = mem_available_bytes(device)
    failures = 0
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        overall = progress.add_task("all runs", total=steps * len(runs))
        for cfg in runs:
            name = f"{cfg.label} ({cfg.fixed_rows:.0e} rows)"
            if cfg.variant != "ps" and torch_bytes(cfg, samples) * cfg.workers > 0.8 * available:
                need = torch_bytes(cfg, samples) * cfg.workers / 2**30
                outcome = Outcome("skipped", [], {}, 0.0, f"the tables need ~{need:.1f} GiB, "
                                                         f"{available / 2**30:.1f} GiB available")
                progress.advance(overall, steps)
            else:
                task = progress.add_task(name, total=steps)

                def advance(n: int, task=task) -> None:
                    if n > 0:
                        progress.advance(task, n)
                        progress.advance(overall, n)

                outcome = runner.run(cfg, advance)
                progress.remove_task(task)
            if outcome.status == "failed":
                failures += 1
                console.print(f"[red]{name} failed[/red]: {outcome.reason}")
            elif outcome.status == "skipped":
                console.print(f"{name}: skipped ({outcome.reason})")
            report.add(summarize(cfg, outcome))
    report.print(console)
    (out_dir / "embeddings.json").write_text(json.dumps(report.to_json(), indent=1))
    (out_dir / "results.md").write_text(report.markdown())
    report.plot(plot_path)
    console.print(f"wrote {out_dir / 'embeddings.json'}, {out_dir / 'results.md'}, {plot_path}")
    if failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
