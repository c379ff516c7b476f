"""Trace events: the step filter, each process's file, and the merged trace.json."""

from __future__ import annotations

import json

import pytest

from psframework.errors import ConfigError
from psframework.trace import Tracer, merge, parse_steps


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
    (tmp_path / "worker-1-999.jsonl").write_text('{"name": "process_name", "ph": "M", "pid": 999, '
                                                 '"args": {"name": "worker 1"}}\n{"name": "cut sho')  # killed mid-line
    path, processes = merge(str(tmp_path))
    assert path == tmp_path / "trace.json" and processes == 3
    events = json.loads(path.read_text())["traceEvents"]
    names = sorted(e["args"]["name"] for e in events if e["name"] == "process_name")
    assert names == ["server 1", "worker 0", "worker 1"]
    spans = [e for e in events if e["ph"] == "X"]
    assert sorted(e["args"]["step"] for e in spans if e["name"] == "PushPull") == [1, 2]
    apply = next(e for e in spans if e["name"] == "apply")
    assert apply["args"] == {"blocks": [0]} and apply["dur"] >= 0 and apply["pid"] != 999
