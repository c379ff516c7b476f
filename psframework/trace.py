"""Timelines: Chrome trace events (the Trace Event Format that Perfetto and chrome://tracing open).

With ``PS_TRACE_DIR`` (``ps-launch --trace DIR``) every process appends its events, one JSON
object per line, to ``DIR/<role>-<rank>-<pid>.jsonl``: workers their exchanges (push, pull,
push_pull), each request to a server and the time blocked waiting; servers each request they
handle, each optimizer step and each answer. ``PS_TRACE_STEPS=a:b`` keeps the workers' steps a
to b-1 (and the servers' work on them). ``merge`` makes one ``trace.json`` of a directory, one
track per process. A tracer that is off costs one attribute test per event.
"""

from __future__ import annotations

import json
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Optional

from .errors import ConfigError

MERGED = "trace.json"


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
        self._file: Optional[IO[str]] = None
        self._directory = Path(directory) if directory else None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def start(self, role: str, rank: int, step: Optional[int] = None) -> None:
        """Open this process's file once its role and rank are known (``step``: its current one)."""
        self.step = step
        if not self.enabled or self._file is not None:
            return
        try:
            self._directory.mkdir(parents=True, exist_ok=True)
            self._file = open(self._directory / f"{role}-{rank}-{self._pid}.jsonl", "a", buffering=1 << 16)
        except OSError as exc:
            raise ConfigError(f"PS_TRACE_DIR={self._directory}: cannot write there ({exc.strerror or exc})") from None
        self._write({"name": "process_name", "ph": "M", "pid": self._pid, "args": {"name": f"{role} {rank}"}})
        self._write({"name": "process_sort_index", "ph": "M", "pid": self._pid,
                     "args": {"sort_index": {"scheduler": 0, "server": 1000}.get(role, 2000) + rank}})

    def wants(self, step: Optional[int]) -> bool:
        """Whether work of this step (None: the current one) is traced."""
        step = self.step if step is None else step
        return self._file is not None and (self.steps is None or step is None
                                           or self.steps[0] <= step < self.steps[1])

    def complete(self, name: str, start_us: float, category: str, step: Optional[int] = None, **args) -> None:
        """A span from ``start_us`` (``now_us()`` when it began) until now."""
        if self.wants(step):
            event = {"name": name, "cat": category, "ph": "X", "ts": start_us, "dur": _now_us() - start_us,
                     "pid": self._pid, "tid": threading.get_ident() % 1_000_000}
            if step is not None:
                args["step"] = step
            if args:
                event["args"] = args
            self._write(event)

    def instant(self, name: str, category: str, **args) -> None:
        if self._file is not None:
            self._write({"name": name, "cat": category, "ph": "i", "s": "g", "ts": _now_us(), "pid": self._pid,
                         "tid": threading.get_ident() % 1_000_000, "args": args})

    @contextmanager
    def span(self, name: str, category: str, step: Optional[int] = None, **args) -> Iterator[None]:
        if not self.wants(step):
            yield
            return
        start = _now_us()
        try:
            yield
        finally:
            self.complete(name, start, category, step, **args)

    def now_us(self) -> float:
        return _now_us() if self._file is not None else 0.0

    def _write(self, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def merge(directory: str) -> tuple[Path, int]:
    """One ``trace.json`` ({"traceEvents": [...]}) of every process's events in ``directory``;
    returns its path and the number of processes. A line cut short by a killed process is skipped."""
    root = Path(directory)
    events, processes = [], 0
    for path in sorted(root.glob("*.jsonl")):
        processes += 1
        for line in path.read_text(errors="replace").splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    target = root / MERGED
    tmp = root / f".{MERGED}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}))
    os.replace(tmp, target)
    return target, processes


__all__ = ["MERGED", "Tracer", "merge", "parse_steps"]
