"""Smoke test of benchmarks/chaos.py: its --quick run accounts for every push exactly and leaves no
process of the run alive; and the replay that the accounting rests on, on records made by hand."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHAOS = ROOT / "benchmarks" / "chaos.py"


def _ledger():
    spec = importlib.util.spec_from_file_location("bench_chaos_ledger", CHAOS.with_name("_chaos_ledger.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _push(t: float, ok: bool = True, c: int = 0, ep: int = 0) -> dict:
    return {"k": "p", "t": t, "i": 0, "ok": ok, "ep": ep, "c": c, "loss": 1.0, **({} if ok else {"err": "X"})}


def test_replay_takes_a_rollback_back_to_the_last_write_of_its_checkpoint():
    chaos = _ledger()
    records = [{"k": "registered", "t": 0.0, "ep": 0}, _push(1.0, c=1), _push(2.0, c=2),  # in step-2
               _push(4.0, c=3), _push(5.0, ok=False), {"k": "rb", "t": 5.0, "ep": 1, "step": 2},
               _push(6.0, c=3, ep=1)]
    # step-2 written at 3 s, and again at 9 s (the first checkpoint after the rollback has its step)
    epochs = chaos.Epochs(steps={1: 2}, heard={1: 4.5})
    ledger = chaos.replay(records, {"step-00000002": [3.0, 9.0]}, epochs, last_epoch=1)
    assert (ledger.acked, ledger.lost, ledger.expected, dict(ledger.failed)) == (4, 1, 3, {"X": 1})
    assert ledger.mismatches == [] and ledger.unknown == []
    # psframework now names the second checkpoint of a step step-N-1: it counts as a write of step N
    renamed = chaos.replay(records, {"step-00000002-1": [3.0], "step-00000002": [1.5]}, epochs, last_epoch=1)
    assert (renamed.acked, renamed.lost, renamed.expected) == (4, 1, 3) and renamed.unknown == []
    # a process that died before the rollbacks did not hear them: replayed at the end all the same,
    # each at its time (the second goes back to step-3, written after the first rollback)
    epochs = chaos.Epochs(steps={1: 2, 2: 3}, heard={1: 4.5, 2: 12.0})
    dead = chaos.replay(records[:4], {"step-00000002": [3.0], "step-00000003": [10.0]}, epochs, last_epoch=2)
    assert (dead.lost, dead.expected) == (1, 2)


def test_replay_a_checkpoint_written_after_a_rollback_that_the_worker_heard_of_late_holds_the_reset():
    chaos = _ledger()
    records = [{"k": "registered", "t": 0.0, "ep": 0}, _push(1.0, c=1), _push(2.0, c=2),
               {"k": "rb", "t": 5.0, "ep": 1, "step": 1}, _push(6.0, c=2, ep=1),
               {"k": "rb", "t": 7.0, "ep": 2, "step": 9}]
    # step-1 written at 1.5; the job went back to it at 3.0 (others heard then), this worker waited in
    # a checkpoint (step-9, written at 4.0, after the rollback) and heard only at 5.0
    epochs = chaos.Epochs(steps={1: 1, 2: 9}, heard={1: 3.0, 2: 7.0})
    ledger = chaos.replay(records, {"step-00000001": [1.5], "step-00000009": [4.0]}, epochs, last_epoch=2)
    assert (ledger.acked, ledger.lost, ledger.expected) == (3, 2, 1)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_chaos_balances_exactly_and_leaves_no_process(tmp_path):
    out, plot = tmp_path / "out", tmp_path / "chaos.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(CHAOS), "--quick", "--out", str(out), "--plot", str(plot)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, f"chaos.py failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((out / "chaos.json").read_text())
    accounting = results["accounting"]
    assert accounting["balanced"] and accounting["problems"] == [], accounting
    totals = accounting["totals"]
    assert totals["acked"] > 0 and totals["acked"] - totals["lost"] == totals["expected"]
    survivors = [s for s in accounting["slots"] if s["survivor"]]
    assert survivors and all(s["applied"] == s["expected"] for s in survivors), survivors
    assert results["faults"]["total"] >= 1
    processes = results["processes"]
    assert processes["left_after_the_job_ended"] == [] and processes["left_at_exit"] == [], processes
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
