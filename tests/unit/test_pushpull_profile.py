"""benchmarks/pushpull_profile.py's reading of two processes' traces: synthetic events, no GPU."""

from __future__ import annotations

from benchmarks.pushpull_profile import TRIP, describe


def _span(name: str, ts: float, dur: float, cat: str) -> dict:
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat}


def test_the_switches_between_the_processes_are_read_off_the_two_timelines():
    worker = [_span(TRIP, 1000, 1600, "user_annotation"),
              _span("copy in", 1200, 160, "kernel"),
              _span("copy out", 2290, 160, "kernel"),
              _span("copy before the trip", 900, 50, "kernel")]
    server = [_span("cudaLaunchKernel", 1600, 10, "cuda_runtime"),
              _span("step", 1760, 250, "kernel"),
              _span("to the pull slot", 2010, 130, "gpu_memcpy")]
    [line] = describe(worker, server)
    assert "round trip   1600 us" in line
    assert "worker GPU 200-1450 (2 ops, 320 us busy)" in line
    assert "server GPU 760-1140 (2 ops, 380 us busy)" in line
    assert "its first kernel 160 us later" in line
    assert "worker's next 150 us" in line
    assert "GPU busy 700 us" in line
