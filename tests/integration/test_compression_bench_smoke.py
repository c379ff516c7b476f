"""Smoke test of benchmarks/compression.py: its --quick run (4 virtual hosts, 1 Gbit/s links, no
compression and TopK(0.01)) writes both rows, with TopK's pushes at least 20x smaller, and its
report's ratios on made-up rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration import netns as vnet

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "compression.py"
sys.path.insert(0, str(ROOT))


def test_the_report_gives_ratios_to_no_compression():
    from benchmarks.compression import report

    rows = [{"codec": "none", "push_bytes_per_step": 8e6, "wire_bytes_per_step": 16e6, "step_ms": 200.0,
             "time_to_target_s": 10.0, "final_acc": 0.97},
            {"codec": "int8", "push_bytes_per_step": 2e6, "wire_bytes_per_step": 10e6, "step_ms": 150.0,
             "time_to_target_s": 5.0, "final_acc": 0.965},
            {"codec": "onebit", "push_bytes_per_step": 0.25e6, "wire_bytes_per_step": 8.25e6, "step_ms": 150.0,
             "time_to_target_s": None, "final_acc": 0.9}]
    table = report("1gbit", rows, 0.95).splitlines()
    assert table[2].startswith("| none | 8.00 MB | 1.0x | 16.00 MB | 1.0x | 200 | 10.0 | 1.0x |")
    assert "| int8 | 2.00 MB | 4.0x | 10.00 MB | 1.6x | 150 | 5.0 | 2.0x | 0.9650 |" in table[3]
    assert "| not reached | - |" in table[4]


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_quick_run(tmp_path):
    reason = vnet.netns_unavailable_reason()
    if reason:
        pytest.skip(reason)
    run = subprocess.run([sys.executable, str(BENCH), "--quick", "--out-dir", str(tmp_path)], cwd=str(ROOT),
                         capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["codec"]: r for r in json.loads((tmp_path / "results.json").read_text())["1gbit"]}
    assert set(rows) == {"none", "topk0.01"}
    assert rows["none"]["push_bytes_per_step"] > 8e6  # 2.2 million float32 values
    assert rows["none"]["push_bytes_per_step"] / rows["topk0.01"]["push_bytes_per_step"] >= 20
    assert all(0.5 < r["final_acc"] <= 1 for r in rows.values())
    assert (tmp_path / "compression.png").stat().st_size > 0
