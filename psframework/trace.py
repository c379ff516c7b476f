"""Timelines: Chrome trace events (the Trace Event Format that Perfetto and chrome://tracing open).

With ``PS_TRACE_DIR`` (``ps-launch --trace DIR``) every process records its events in
``DIR/<role>-<rank>-<pid>.events``: workers their exchanges (push, pull, push_pull), each request
to a server and the time blocked waiting; servers each request they handle, each optimizer step
and each answer. ``PS_TRACE_STEPS=a:b`` keeps the workers' steps a to b-1 (and the servers' work
on them). ``merge`` makes one ``trace.json`` of a directory, one track per process.

A tracer that is off costs one attribute test per event. One that is on keeps its events as
tuples and writes them, ``FLUSH_EVENTS`` at a time (and when it closes, or the process exits), as
msgpack: a process's file is its header, then lists of events, and only ``merge`` writes JSON.
Writing each event as a JSON line when it happened cost 16-21 us on the 2-core machine, a tenth
of a 2 ms step of the digits job (benchmarks/RESULTS.md, "What observability costs").
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from pathlib import Path
from typing import IO, Optional

import msgpack

from .errors import ConfigError

MERGED = "trace.json"
SUFFIX = ".events"
FLUSH_EVENTS = 8192  # events kept before they are written (a few MB at most)


def parse_steps(text: Optional[str]) -> Optional[tuple[int, int]]:
    """``"a:b"`` -> (a, b): steps a to b-1; ``":b"`` and ``"a:"`` are open on one side."""
    if not text:
        return None
    first, sep, last = text.partition(":")
    try:
        if not sep:
            raise ValueError
        span = (int(first) if first else 0, int(last) if last else 1 << 62)
    except ValueError:
        raise ConfigError(f"PS_TRACE_STEPS={text!r}: use a:b (steps a to b-1), a: or :b") from None
    if span[0] >= span[1]:
        raise ConfigError(f"PS_TRACE_STEPS={text!r}: the first step must come before the last")
    return span


def _now_us() -> float:
    return time.perf_counter_ns() / 1000.0


class Tracer:
    """A process's trace events. ``enabled`` is False without a directory: every call returns at once."""

    def __init__(self, directory: Optional[str], steps: Optional[tuple[int, int]] = None):
        self.enabled = directory is not None
        self.steps = steps
        self.step: Optional[int] = None  # the process's current step: for events that name none
        self._file: Optional[IO[bytes]] = None
        self._directory = Path(directory) if directory else None
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._events: list[tuple] = []  # not yet written: (name, category, ts, dur or None for an instant, tid, args)

    def start(self, role: str, rank: int, step: Optional[int] = None) -> None:
        """Open this process's file once its role and rank are known (``step``: its current one)."""
        self.step = step
        if not self.enabled or self._file is not None:
            return
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self._directory / f"{role}-{rank}-{self._pid}{SUFFIX}", "ab")
        except OSError as exc:
            raise ConfigError(f"PS_TRACE_DIR={self._directory}: cannot write there ({exc.strerror or exc})") from None
        atexit.register(self.close)  # a process that exits without closing its worker keeps its events
        order = {"scheduler": 0, "server": 1000}.get(role, 2000) + rank
        self._file.write(msgpack.packb({"pid": self._pid, "name": f"{role} {rank}", "sort_index": order}))
        self._file.flush()

    def wants(self, step: Optional[int]) -> bool:
        """Whether work of this step (None: the current one) is traced."""
        step = self.step if step is None else step
        return self._file is not None and (self.steps is None or step is None
                                           or self.steps[0] <= step < self.steps[1])

    def complete(self, name: str, start_us: float, category: str, step: Optional[int] = None, **args) -> None:
        """A span from ``start_us`` (``now_us()`` when it began) until now."""
        if self.wants(step):
            if step is not None:
                args["step"] = step
            self._record((name, category, start_us, _now_us() - start_us, threading.get_ident() % 1_000_000, args))

    def instant(self, name: str, category: str, **args) -> None:
        if self._file is not None:
            self._record((name, category, _now_us(), None, threading.get_ident() % 1_000_000, args))

    def span(self, name: str, category: str, step: Optional[int] = None, **args) -> "_Span":
        """``with tracer.span(...):`` records the block's time (a class, not a generator: half the cost)."""
        return _Span(self, name, category, step, args) if self.wants(step) else _NO_SPAN

    def now_us(self) -> float:
        return _now_us() if self._file is not None else 0.0

    def _record(self, event: tuple) -> None:
        with self._lock:
            self._events.append(event)
            if len(self._events) >= FLUSH_EVENTS:
                self._flush()

    def _flush(self) -> None:
        """Write the events kept so far (the lock is held)."""
        if self._file is not None and self._events:
            self._file.write(msgpack.packb(self._events))
            self._file.flush()
        self._events = []

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._flush()
                self._file.close()
                self._file = None


class _Span:
    __slots__ = ("tracer", "name", "category", "step", "args", "start")

    def __init__(self, tracer: Tracer, name: str, category: str, step: Optional[int], args: dict):
        self.tracer, self.name, self.category, self.step, self.args = tracer, name, category, step, args

    def __enter__(self) -> None:
        self.start = _now_us()

    def __exit__(self, *exc) -> None:
        self.tracer.complete(self.name, self.start, self.category, self.step, **self.args)


class _NoSpan:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


_NO_SPAN = _NoSpan()


def _read_events(path: Path) -> list[dict]:
    """A process's events as Trace Event Format dicts; a batch cut short by a killed process ends it."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(path.read_bytes())
    try:
        header = unpacker.unpack()
        pid = header["pid"]
        events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": header["name"]}},
                  {"name": "process_sort_index", "ph": "M", "pid": pid, "args": {"sort_index": header["sort_index"]}}]
    except (msgpack.OutOfData, ValueError, TypeError, KeyError):
        return []
    while True:
        try:
            batch = unpacker.unpack()
        except (msgpack.OutOfData, ValueError):
            return events
        for name, category, ts, dur, tid, args in batch:
            event = {"name": name, "cat": category, "ts": ts, "pid": pid, "tid": tid}
            if dur is None:
                event.update(ph="i", s="g", args=args)
            else:
                event.update(ph="X", dur=dur)
                if args:
                    event["args"] = args
            events.append(event)


def merge(directory: str) -> tuple[Path, int]:
    """One ``trace.json`` ({"traceEvents": [...]}) of every process's events in ``directory``;
    returns its path and the number of processes."""
    root = Path(directory)
    events, processes = [], 0
    for path in sorted(root.glob(f"*{SUFFIX}")):
        processes += 1
        events += _read_events(path)
    target = root / MERGED
    tmp = root / f".{MERGED}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, target)
    return target, processes


__all__ = ["MERGED", "Tracer", "merge", "parse_steps"]
