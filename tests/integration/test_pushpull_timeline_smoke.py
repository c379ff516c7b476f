"""Smoke test of benchmarks/pushpull_timeline.py on the CPU: it times its round trips and prints
the traced exchange with the server's events for every block."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_timeline_shows_the_servers_work_on_each_block_of_the_exchange():
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "pushpull_timeline.py"), "--device", "cpu",
                          "--mib", "4", "--chunk-mib", "1", "--rounds", "3", "--show", "1"],
                         capture_output=True, text=True, timeout=120, env=_env())
    assert run.returncode == 0, run.stderr
    first, *timeline = run.stdout.splitlines()
    assert re.match(r"4 MiB on cpu, blocks of 1 MiB: median \d+\.\d+ ms \(\d+\.\d GB/s\)", first), first
    assert timeline[0].startswith("exchange of ")
    for block in range(4):  # 4 MiB in blocks of 1 MiB
        assert any(line.endswith(f"PushPull block {block}") for line in timeline), timeline
    assert any(line.split()[2:] == ["server", "0", "apply"] for line in timeline), timeline


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("PS_")} | {"PYTHONPATH": str(ROOT)}
