"""What observability costs: metrics and tracing on, against off, in the same run.

    python benchmarks/observability.py                 # 3 rounds (about 4 minutes on 2 cores)
    python benchmarks/observability.py --rounds 1      # a quick look

Two jobs under ps-launch on this host, each run with nothing on, with ``--metrics-port 0`` (and
a scrape of the endpoint every second, as Prometheus would) and with ``--trace DIR``; the three
variants alternate within every round, so a slow spell of a shared machine hits all of them:

* push_pull of one 64 MiB float32 tensor, 1 server and 1 worker: the median round trip of
  ``--repeats`` (``_observability_worker.py``);
* ``examples/train_digits.py`` (``make train``'s job, 2 servers, 2 workers, sync): its training
  seconds as worker 0 prints them.

The table gives, per variant, the median over rounds and the speed relative to off (off's time /
the variant's). Targets (issue 16): metrics >= 0.97, tracing >= 0.9.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Optional

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("off", "metrics", "trace")
JOBS = ("pushpull", "digits")
SHOWN = {"pushpull": ("push_pull 64 MiB, ms", lambda seconds: f"{seconds * 1e3:.1f}"),  # column, cell
         "digits": ("digits job training, s", lambda seconds: f"{seconds:.2f}")}
TRAINED = re.compile(r"epoch (\d+)/(\d+) .*\((\d+(?:\.\d+)?) s, mode")
METRICS_AT = re.compile(r"metrics (http://\S+/metrics)")


def launch_args(variant: str, workdir: Path) -> list[str]:
    if variant == "metrics":
        return ["--metrics-port", "0"]
    if variant == "trace":
        return ["--trace", str(workdir / "trace")]
    return []


def run_job(variant: str, workdir: Path, nodes: list[str], worker: list[str], timeout: float) -> str:
    """One ps-launch job; returns its output. With metrics on, a scraper reads the endpoint every second."""
    argv = [sys.executable, "-m", "psframework.launch", *nodes, "--server-device", "cpu",
            *launch_args(variant, workdir), "--", sys.executable, *worker]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    stop = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            found = METRICS_AT.search(line)
            if found:
                threading.Thread(target=scrape_every_second, args=(found.group(1), stop), daemon=True).start()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout)
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=5)
    output = "".join(lines)
    if code != 0:
        raise click.ClickException(f"{variant}: ps-launch exited {code}:\n{output[-3000:]}")
    return output


def scrape_every_second(address: str, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        try:
            urllib.request.urlopen(address, timeout=5).read()
        except OSError:
            return  # the job ended


def pushpull_seconds(variant: str, workdir: Path, mib: int, repeats: int, timeout: float) -> float:
    out = workdir / f"pushpull-{variant}.json"
    run_job(variant, workdir, ["-n", "1", "-s", "1"],
            [str(HERE / "_observability_worker.py"), str(out), "--mib", str(mib), "--repeats", str(repeats)], timeout)
    return json.loads(out.read_text())["median_s"]


def digits_seconds(variant: str, workdir: Path, epochs: int, timeout: float) -> float:
    output = run_job(variant, workdir, ["-n", "2", "-s", "2", "--mode", "sync"],
                     [str(ROOT / "examples" / "train_digits.py"), "--epochs", str(epochs)], timeout)
    done = [m for m in TRAINED.finditer(output) if m.group(1) == m.group(2)]
    if not done:
        raise click.ClickException(f"{variant}: the digits job printed no last epoch:\n{output[-2000:]}")
    return float(done[-1].group(3))


def table(results: dict[str, dict[str, list[float]]]) -> tuple[Table, list[str]]:
    view = Table(title="observability: median over rounds, speed relative to off")
    jobs = list(results["off"])
    columns = ["variant"] + [c for job in jobs for c in (SHOWN[job][0], "x off")]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for column in columns:
        view.add_column(column, justify="right")
    off = {k: statistics.median(v) for k, v in results["off"].items()}
    for variant in VARIANTS:
        med = {k: statistics.median(v) for k, v in results[variant].items()}
        cells = [variant]
        for job in jobs:
            cells += [SHOWN[job][1](med[job]), f"{off[job] / med[job]:.3f}"]
        view.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    return view, lines


@click.command()
@click.option("--rounds", type=int, default=3, show_default=True, help="Each round runs every variant once.")
@click.option("--mib", type=int, default=64, show_default=True)
@click.option("--repeats", type=int, default=20, show_default=True, help="Timed push_pulls per job.")
@click.option("--epochs", type=int, default=8, show_default=True, help="Of the digits job.")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds per job.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the Markdown table here.")
@click.option("--only", type=click.Choice(JOBS), multiple=True,
              help="Run only this job (repeatable; default both).")
def main(rounds: int, mib: int, repeats: int, epochs: int, timeout: float, out: Optional[Path],
         only: tuple[str, ...]) -> None:
    """push_pull and the digits job with metrics and tracing on, against off."""
    console = Console()
    jobs = {"pushpull": lambda variant, workdir: pushpull_seconds(variant, workdir, mib, repeats, timeout),
            "digits": lambda variant, workdir: digits_seconds(variant, workdir, epochs, timeout)}
    jobs = {name: run for name, run in jobs.items() if not only or name in only}
    results = {v: {name: [] for name in jobs} for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="ps-observability-") as tmp, Progress(console=console) as progress:
        task = progress.add_task("jobs", total=rounds * len(VARIANTS) * len(jobs))
        for round_ in range(rounds):
            order = VARIANTS[round_ % 3:] + VARIANTS[:round_ % 3]  # who goes first rotates
            for variant in order:
                workdir = Path(tmp) / f"{variant}-{round_}"
                workdir.mkdir()
                for name, run in jobs.items():
                    results[variant][name].append(run(variant, workdir))
                    progress.advance(task)
                    # one line per job, so that a run cut short (or read from a log) still says something
                    progress.console.log(f"round {round_ + 1}/{rounds} {variant} {name}: "
                                         f"{results[variant][name][-1]:.4f} s")
    view, lines = table(results)
    console.print(view)
    console.print("raw: " + json.dumps(results))
    if out is not None:
        out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
