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


def _row(codec, push, wire, step_ms, steps_to, time_to, final_acc, runs):
    return {"codec": codec, "push_bytes_per_step": push, "wire_bytes_per_step": wire, "step_ms": step_ms,
            "steps_to_target": steps_to, "time_to_target_s": time_to, "final_acc": final_acc,
            "runs": [{"time_to_target_s": t} for t in runs]}


def test_the_report_gives_ratios_to_no_compression():
    from benchmarks.compression import report

    rows = [_row("none", 8e6, 16e6, 200.0, 50, 10.0, 0.97, [10.0, 11.0]),
            _row("int8", 2e6, 10e6, 150.0, 48, 5.0, 0.965, [5.0, None]),
            _row("onebit", 0.25e6, 8.25e6, 150.0, None, None, 0.9, [None])]
    table = report("1gbit", rows, 0.95).splitlines()
    assert table[2].startswith("| none | 8.00 MB | 1.0x | 16.00 MB | 1.0x | 200 | 50 | 10.0 (10.0, 11.0) | 1.0x |")
    assert "| int8 | 2.00 MB | 4.0x | 10.00 MB | 1.6x | 150 | 48 | 5.0 (5.0, -) | 2.0x | 0.9650 |" in table[3]
    assert "| - | not reached (-) | - |" in table[4]


def test_a_codecs_row_is_the_median_of_its_runs_and_reached_only_if_most_runs_reached():
    from benchmarks.compression import summarize

    def job(step_s, reached_at, final):  # 10 steps of rank 0 and 1; weights copied at steps 0, 5 and 10
        curve = [(0.0, 0, 0.1), (5 * step_s, 5, 0.96 if reached_at == 5 else 0.9), (10 * step_s, 10, final)]
        records = [{"steps": 10, "stats": [{"push_bytes": 2 * 10 * 1000}], "curve": curve, "params": 7,
                    "step_times": [step_s] * 10, "wall_s": 10 * step_s}, {"step_times": [step_s] * 10,
                                                                          "wall_s": 10 * step_s}]
        return {"records": records, "wire_bytes": 2 * 10 * 3000}

    row = summarize("int8", [job(0.1, 5, 0.97), job(0.3, 10, 0.95), job(0.2, 10, 0.99)], 0.95)
    assert (row["push_bytes_per_step"], row["wire_bytes_per_step"]) == (1000, 3000)
    assert row["step_ms"] == pytest.approx(200) and row["final_acc"] == 0.97
    assert row["time_to_target_s"] == pytest.approx(2.0) and row["steps_to_target"] == 10
    assert [r["time_to_target_s"] for r in row["runs"]] == pytest.approx([0.5, 3.0, 2.0])
    never = summarize("topk", [job(0.1, None, 0.9), job(0.1, None, 0.9), job(0.1, 10, 0.97)], 0.95)
    assert never["time_to_target_s"] is None and never["steps_to_target"] is None


@pytest.mark.netns
@pytest.mark.slow
@pytest.mark.timeout(600)
class _Shaped:
    """A cluster of two hosts that records the tc commands run in and outside its namespaces."""

    cluster_id = "c1"

    def __init__(self, fails: bool = False):
        self.hosts, self.commands, self.fails = ["h0", "h1"], [], fails

    def run_in(self, host, argv, **kw):
        return self.run([f"in {host}:", *argv])

    def run(self, argv, **kw):
        self.commands.append(" ".join(argv))
        failed = self.fails and "netem" in argv
        return subprocess.CompletedProcess(argv, 2 if failed else 0, "", "Specified qdisc kind is unknown.")


def test_a_rate_with_a_delay_puts_each_links_tbf_under_a_netem(monkeypatch):
    import click

    from benchmarks import compression

    cluster = _Shaped()
    monkeypatch.setattr(compression.subprocess, "run", cluster.run)
    compression.limit_links(cluster, "10gbit@0.2ms")
    tbf = "tbf rate 10gbit burst 256kb latency 20ms"
    outside = f"{vnet.PREFIX}v1-c1"
    assert cluster.commands[-6:] == [
        "in h1: tc qdisc del dev eth0 root", "in h1: tc qdisc add dev eth0 root handle 1: netem delay 0.2ms",
        f"in h1: tc qdisc add dev eth0 parent 1:1 handle 10: {tbf}", f"tc qdisc del dev {outside} root",
        f"tc qdisc add dev {outside} root handle 1: netem delay 0.2ms",
        f"tc qdisc add dev {outside} parent 1:1 handle 10: {tbf}"]
    assert len(cluster.commands) == 12  # both ends of both hosts' links
    cluster.commands.clear()
    compression.limit_links(cluster, "1gbit")
    assert cluster.commands[:2] == ["in h0: tc qdisc del dev eth0 root",
                                    "in h0: tc qdisc add dev eth0 root tbf rate 1gbit burst 256kb latency 20ms"]

    no_netem = _Shaped(fails=True)
    monkeypatch.setattr(compression.subprocess, "run", no_netem.run)
    with pytest.raises(click.ClickException, match="netem delay 0.2ms failed: Specified qdisc kind is unknown"):
        compression.limit_links(no_netem, "10gbit@0.2ms")


def test_quick_run(tmp_path):
    reason = vnet.netns_unavailable_reason(ssh=False)
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
