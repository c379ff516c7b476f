"""Smoke test of benchmarks/embeddings.py: its --quick run (torch, ps sync 1 server/1 worker, ps
async 2 servers/2 workers) writes every row with sane numbers, sync training matches torch, and no
process of the run is left; and the pieces it rests on (AUC, the run matrix) on small inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "embeddings.py"
sys.path.insert(0, str(ROOT))


def test_a_process_seen_between_fork_and_exec_is_named_by_what_it_runs_later(monkeypatch):
    """ps-launch forks its servers: sampled before the exec, a server's command line is still the
    launcher's. Its role must follow the exec, or one server goes missing from the report."""
    from benchmarks import _embeddings_watch as watch_module

    looked = []

    def role(pid: int) -> str:
        looked.append(pid)
        return "ps-launch" if looked.count(pid) == 1 else "server 1"

    monkeypatch.setattr(watch_module, "role", role)
    watch = watch_module.MemoryWatch()
    for _ in range(2):
        watch.sample([os.getpid()])
    assert "server 1" in watch.peaks(), watch.peaks()


def test_auc_counts_ties_half_and_matches_the_definition():
    from benchmarks._embeddings_worker import ctr

    assert ctr.auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert ctr.auc(torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 1, 1])) == pytest.approx(0.5)
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.rand(500, generator=g).round(decimals=1), torch.rand(500, generator=g) < 0.3
    pairs = (scores[labels][:, None] > scores[~labels][None, :]).double() \
        + 0.5 * (scores[labels][:, None] == scores[~labels][None, :]).double()
    assert ctr.auc(scores, labels) == pytest.approx(pairs.mean().item())


def test_the_matrix_has_every_configuration_once():
    from benchmarks.embeddings import matrix

    runs = matrix(10**6, [10**5, 10**6], [1, 2, 4], [1, 2], ["sync", "async"], ddp=True)
    labels = [(r.label, r.fixed_rows) for r in runs]
    assert len(labels) == len(set(labels)) == 1 + 1 + 12 + 2
    assert labels[0] == ("torch", 10**6) and ("ps async 4s/2w", 10**6) in labels and ("ps sync 1s/1w", 10**5) in labels


def _run_processes(marker: str) -> list[str]:
    """Command lines of live processes that name this test's output folder (every run's do)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in cmdline:
                found.append(f"{entry}: {cmdline[:200]}")
    return found


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_run_writes_every_row_and_sync_matches_torch(tmp_path):
    from benchmarks._common import child_env

    out = tmp_path / "out"
    plot = out / "embeddings.png"
    argv = [sys.executable, str(BENCH), "--quick", "--out", str(out), "--plot", str(plot)]
    # its own process group, which we end whatever happens
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **child_env()}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=200)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, f"embeddings.py --quick failed ({proc.returncode}):\n{output[-5000:]}"

    results = json.loads((out / "embeddings.json").read_text())
    runs = {r["label"]: r for r in results["runs"]}
    assert list(runs) == ["torch", "ps sync 1s/1w", "ps async 2s/2w"]
    best = results["best_auc"][str(results["settings"]["fixed_rows"])]
    for label, run in runs.items():
        assert run["status"] == "ok" and run["left_running"] == [], (label, run["reason"])
        assert run["samples"] == results["settings"]["samples"] and run["samples_per_s"] > 0, label
        assert 0.5 < run["auc"] < best, (label, run["auc"], best)  # learned something, and no better than the truth
        assert all(m > 50 for m in run["worker_peak_mib"]), (label, run["worker_peak_mib"])
        assert all(r > 0 for r in run["rows_per_s_per_server"]), (label, run["rows_per_s_per_server"])
    sync, torch_run, async_run = runs["ps sync 1s/1w"], runs["torch"], runs["ps async 2s/2w"]
    assert abs(sync["auc_delta"]) <= 0.005, (sync["auc"], torch_run["auc"])
    assert len(async_run["worker_peak_mib"]) == 2 and len(async_run["server_peak_mib"]) == 2
    assert len(async_run["rows_per_s_per_server"]) == 2
    # the servers hold only the rows the run touched; torch holds whole fixed tables and a dictionary
    assert 0 < sync["table_rows"] < torch_run["table_rows"]
    assert any("sync AUC within 0.005 of torch" in line and "met" in line for line in results["targets"])
    assert "python benchmarks/embeddings.py --quick" in (out / "results.md").read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    deadline = time.monotonic() + 10
    while _run_processes(str(out)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _run_processes(str(out)) == []
