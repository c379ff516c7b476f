"""Trace events: the step filter, each process's file, and the merged trace.json."""

from __future__ import annotations

import json

import msgpack
import pytest

from psframework.errors import ConfigError
from psframework.trace import FLUSH_EVENTS, Tracer, merge, parse_steps


@pytest.mark.parametrize("text, steps", [(None, None), ("", None), ("2:5", (2, 5)), (":5", (0, 5)),
                                         ("3:", (3, 1 << 62))])
def test_step_ranges(text, steps):
    assert parse_steps(text) == steps


@pytest.mark.parametrize("text", ["5", "a:b", "5:5", "6:2"])
def test_bad_step_ranges_are_refused(text):
    with pytest.raises(ConfigError, match="PS_TRACE_STEPS"):
        parse_steps(text)


def test_a_tracer_that_is_off_writes_nothing(tmp_path):
    tracer = Tracer(None)
    tracer.start("worker", 0)
    with tracer.span("push", "exchange"):
        pass
    tracer.complete("wait", tracer.now_us(), "wait")
    tracer.close()
    assert not tracer.enabled and list(tmp_path.iterdir()) == []


def test_every_process_is_a_track_and_only_the_chosen_steps_are_kept(tmp_path):
    worker, server = Tracer(str(tmp_path), (1, 3)), Tracer(str(tmp_path), (1, 3))
    worker.start("worker", 0)
    server.start("server", 1)
    for step in range(5):
        with worker.span("PushPull", "exchange", step=step):
            pass
    with server.span("apply", "apply", blocks=[0]):
        pass
    worker.close()
    server.close()
    killed = msgpack.packb({"pid": 999, "name": "worker 1", "sort_index": 2001}) + msgpack.packb(
        [["PushPull", "exchange", 1.0, 2.0, 7, {"step": 1}]])
    (tmp_path / "worker-1-999.events").write_bytes(killed + msgpack.packb([["cut", "short", 3.0, 1.0, 7, {}]])[:-5])
    path, processes = merge(str(tmp_path))
    assert path == tmp_path / "trace.json" and processes == 3
    events = json.loads(path.read_text())["traceEvents"]
    names = sorted(e["args"]["name"] for e in events if e["name"] == "process_name")
    assert names == ["server 1", "worker 0", "worker 1"]
    spans = [e for e in events if e["ph"] == "X"]
    assert sorted((e["args"]["step"], e["pid"]) for e in spans if e["name"] == "PushPull") == sorted(
        [(1, 999)] + [(step, worker._pid) for step in (1, 2)])  # pids: the killed one's may be the larger
    assert "cut" not in {e["name"] for e in events}  # the batch a killed process left half-written
    apply = next(e for e in spans if e["name"] == "apply")
    assert apply["args"] == {"blocks": [0]} and apply["dur"] >= 0 and apply["pid"] != 999


def _lines(tmp_path) -> list[dict]:
    return json.loads(merge(str(tmp_path))[0].read_text())["traceEvents"]


def test_events_are_kept_in_memory_and_written_in_batches_and_at_close(tmp_path):
    tracer = Tracer(str(tmp_path))
    tracer.start("worker", 0)
    tracer.complete("push", tracer.now_us(), "exchange", step=0, block=3)
    tracer.instant("rollback", "membership", step=7)
    # serializing each event as it came cost 16-21 us, a tenth of a 2 ms step (benchmarks/RESULTS.md)
    assert not [e for e in _lines(tmp_path) if e["name"] in ("push", "rollback")]
    for step in range(FLUSH_EVENTS):
        tracer.complete("push", tracer.now_us(), "exchange", step=step)
    written = [e for e in _lines(tmp_path) if e["name"] == "push"]
    assert len(written) >= FLUSH_EVENTS - 1  # a full batch went out before the tracer closes
    tracer.close()
    events = _lines(tmp_path)
    pushes = [e for e in events if e["name"] == "push"]
    assert len(pushes) == FLUSH_EVENTS + 1 and pushes[0]["args"] == {"block": 3, "step": 0}
    assert pushes[0]["ph"] == "X" and pushes[0]["dur"] >= 0 and pushes[0]["pid"] == pushes[-1]["pid"]
    rollback = next(e for e in events if e["name"] == "rollback")
    assert rollback["ph"] == "i" and rollback["s"] == "g" and rollback["args"] == {"step": 7}
    tracer.complete("late", tracer.now_us(), "exchange")  # after close: nothing, no error
    assert "late" not in {e["name"] for e in _lines(tmp_path)}
