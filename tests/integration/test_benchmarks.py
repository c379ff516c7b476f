"""Smoke tests of the benchmarks: their quickest forms run and write sane output.

Timings are not asserted (CI machines are noisy); numbers must be present and positive, files
written, and the trained model better than chance (0.1 on ten classes).
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(script: str, *args: str, timeout: float = 110) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- pure helpers


def test_one_bandwidth_definition_for_every_baseline():
    pushpull = _load("pushpull")
    assert pushpull.gbps(10**9, 2.0) == pytest.approx(1.0)  # 1 GB out + 1 GB back in 2 s
    assert pushpull.round_times([[1.0, 2.0], [3.0, 1.0]]) == [3.0, 2.0]  # the slowest worker


def test_modes_parse_and_reject_garbage():
    sva = _load("sync_vs_async")
    assert [(m.mode, m.staleness) for m in sva.parse_modes("sync, async,ssp4")] == [
        ("sync", 0), ("async", 0), ("ssp", 4)]
    with pytest.raises(click.BadParameter, match="unknown mode"):
        sva.parse_modes("sync,ssp")


def test_pushpull_rejects_bad_sizes_before_starting_anything():
    result = CliRunner().invoke(_load("pushpull").main, ["--sizes", "1,x"])
    assert result.exit_code == 2 and "comma-separated integers" in result.output


# ----------------------------------------------------------------------------- real runs


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_pushpull_smallest_sweep(tmp_path):
    out = tmp_path / "pushpull.csv"
    stdout = _run("pushpull.py", "--sizes", "1", "--servers", "1", "--workers", "1,2", "--repeats", "2",
                  "--warmup", "1", "--out", str(out))
    assert "PS/zmq" in stdout
    rows = _csv(out)
    assert [(r["servers"], r["workers"], r["size_mib"]) for r in rows] == [("1", "1", "1"), ("1", "2", "1")]
    for row in rows:
        for key in ("ps_median_s", "ps_gbps", "ps_alone_median_s", "ps_alone_gbps", "raw_zmq_gbps",
                    "raw_zmq_copy_gbps", "minimal_ps_gbps", "ps_over_raw_zmq", "ps_over_raw_zmq_copy",
                    "ps_over_minimal_ps"):
            assert float(row[key]) > 0, (key, row)
    assert rows[0]["gloo_gbps"] == ""  # nothing to all_reduce with one process
    assert float(rows[1]["gloo_gbps"]) > 0 and float(rows[1]["ps_over_gloo"]) > 0
    rounds = json.loads(out.with_suffix(".rounds.json").read_text())
    assert len(rounds["ps_and_zmq"]) == 2 and rounds["gloo"]


def _check_sva(out_dir: Path, plot: Path, expected: list[tuple[str, str]]) -> None:
    rows = _csv(out_dir / "summary.csv")
    assert [(r["panel"], r["mode"]) for r in rows] == expected
    for row in rows:
        assert float(row["final_acc"]) > 0.1, row  # better than chance
        assert float(row["steps_per_s"]) > 0 and float(row["updates_per_s"]) > 0 and float(row["wall_s"]) > 0
    series = json.loads((out_dir / "series.json").read_text())["series"]
    for panel, mode in expected:
        records = series[panel][mode]
        assert any("loss" in r for r in records) and any("acc" in r for r in records)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_sync_vs_async_under_ps_launch(tmp_path):
    out_dir, plot = tmp_path / "out", tmp_path / "plot.png"
    stdout = _run("sync_vs_async.py", "--workers", "2", "--servers", "1", "--modes", "sync,async", "--steps", "60",
                  "--lr", "0.025", "--straggler", "2", "--out-dir", str(out_dir),
                  "--plot", str(plot))
    assert "time to 90%" in stdout
    straggler = "straggler: rank 1 x2"
    _check_sva(out_dir, plot, [("no straggler", "sync"), ("no straggler", "async"),
                               (straggler, "sync"), (straggler, "async")])
    assert (out_dir / "logs" / "sync-straggler1" / "ps-launch.log").exists()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sync_vs_async_local_stand_in(tmp_path):
    out_dir, plot = tmp_path / "out", tmp_path / "plot.png"
    _run("sync_vs_async.py", "--no-launcher", "--workers", "2", "--servers", "1", "--modes", "ssp1", "--steps",
         "60", "--lr", "0.025", "--straggler", "1", "--out-dir", str(out_dir), "--plot", str(plot))
    _check_sva(out_dir, plot, [("no straggler", "ssp1")])


@pytest.mark.timeout(300)
def test_observability_quick_run_compares_every_variant_with_off(tmp_path):
    out = tmp_path / "observability.md"
    _run("observability.py", "--rounds", "1", "--repeats", "2", "--epochs", "1", "--mib", "1", "--out", str(out),
         timeout=300)
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines()[2:]]
    assert [r[0].strip() for r in rows] == ["off", "metrics", "trace"]
    for row in rows:
        assert all(float(cell) > 0 for cell in row[1:]), row
    assert rows[0][2].strip() == rows[0][4].strip() == "1.000"


def test_tiles_compares_every_tile_size_with_the_whole_sum_and_checks_the_bits():
    out = _run("tiles.py", "--mib", "2", "--block-mib", "1", "--workers", "3", "--momentum", "0.9",
               "--tiles", "0.25,4", "--repeats", "2", timeout=60)
    rows = [line for line in out.splitlines() if line.startswith("| whole") or line.startswith("| tiled")]
    assert [row.split("|")[1].strip() for row in rows] == ["whole", "tiled, 0.25 MiB", "tiled, 4 MiB"]
    assert all(row.rstrip(" |").endswith("yes") for row in rows), out
    assert all(float(row.split("|")[2]) > 0 for row in rows)


def test_step_overhead_times_the_workers_step_beside_torchs():
    out = _run("step_overhead.py", "--layers", "1", "--steps", "5", "--warmup", "1", timeout=90)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith(("| torch", "| ps."))]
    assert [row[0].strip() for row in rows] == ["torch.optim.Adam, one process",
                                                "ps.DistributedOptimizer, sync, 1 server, overlap off",
                                                "ps.DistributedOptimizer, sync, 1 server, overlap on"], out
    assert all(float(row[1]) > 0 and float(row[2]) > 0 and float(row[4]) >= float(row[1]) for row in rows), out
    assert "17 tensors" in out, out  # 12 per layer and 5 around them
    staged, copied = re.search(r"stage of the 17 gradients: (\d+) us, of which its fused copy (\d+) us", out).groups()
    assert int(staged) >= int(copied) > 0, out


def test_round_trip_times_the_ps_beside_raw_zmq_through_lanes_and_tcp():
    out = _run("round_trip.py", "--sizes-kib", "1,64", "--repeats", "5", "--warmup", "1", timeout=90)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[0].strip() for row in rows] == ["1", "64"], out
    for row in rows:
        lane_zmq, lane_ps, _, tcp_zmq, tcp_ps, _ = (float(cell) for cell in row[1:])
        assert min(lane_zmq, lane_ps, tcp_zmq, tcp_ps) > 0, out


def test_direct_times_shared_tensors_and_the_optimizers_step_beside_the_lanes():
    """It checks itself that every timed round trip of shared tensors went direct."""
    out = _run("direct.py", "--sizes-kib", "4", "--repeats", "3", "--warmup", "1", "--width", "64", "--steps", "3",
               "--rounds", "1", timeout=90)
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row[0].strip() for row in rows] == ["4", "1"], out  # the size's row, then the round's
    assert all(float(cell) > 0 for row in rows for cell in row[1:]), out
    assert "median ratio" in out, out


def test_pushpull_profile_traces_the_worker_and_the_server(tmp_path):
    out = _run("pushpull_profile.py", "--mib", "1", "--device", "cpu", "--trips", "2", "--out", str(tmp_path),
               timeout=90)
    assert "2 profiled round trips" in out, out
    assert sum(line.startswith("round trip") for line in out.splitlines()) == 2, out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.json.gz", "worker.json.gz"]
