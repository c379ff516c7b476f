"""The accounting of ``chaos.py``: the workers' records of their pushes replayed against the
checkpoints the scheduler wrote and the rollbacks the job went through. Pure: files and records in,
numbers out (``tests/integration/test_chaos_smoke.py`` feeds it records made by hand).

Records are those of ``_chaos_worker.py``; times are seconds since the run's t0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Optional

WRITTEN = re.compile(r"^(\S+ \S+) scheduler INFO checkpoint (\S+) written")
REFUSED = "a checkpoint operation is already running"
REFUSAL_WINDOW = 5.0  # seconds: a checkpoint written this soon after a worker's part was refused went without it


@dataclass
class Ledger:
    """One worker process's pushes replayed: how many of them the servers must hold.

    An acknowledged push adds one. A rollback to a checkpoint takes the count back to what it was
    when that checkpoint was written (the scheduler logs each write): every worker that took part
    had drained its pushes and waited in the collective then, and one that did not take part had
    nothing in flight but, if it was killed, one push. A step can be written twice (the first
    checkpoint after a rollback, before any push, has the same step: ``step-N-1``, or ``step-N``
    again before psframework gave it a name of its own), so the write that counts is the last one of
    that step before the rollback was first heard of.

    A checkpoint that started without this worker (its part refused: "already running") is no cut
    through its pushes: those acknowledged between the refusal and the write may or may not be in
    it. They are counted as ``uncertain`` when the job goes back to that checkpoint."""

    writes: dict[str, list[float]]  # checkpoint name -> when it was written, seconds since t0
    heard: dict[int, float]  # rollback epoch -> when it was first heard of (or logged done)
    expected: int = 0
    history: list = field(default_factory=lambda: [(-math.inf, 0)])
    epoch: int = 0
    sent: int = 0
    acked: int = 0
    lost: int = 0
    failed: Counter = field(default_factory=Counter)
    mismatches: list = field(default_factory=list)  # acknowledged pushes whose pulled count disagrees
    straddles: int = 0
    unknown: list = field(default_factory=list)  # rollbacks to checkpoints never written before
    refused: list = field(default_factory=list)  # when its checkpoint parts were refused
    acks: list = field(default_factory=list)  # when its pushes were acknowledged
    uncertain: int = 0

    def at(self, t: float) -> int:
        """The count at time ``t``: the last entry (in the order things happened to this worker) from
        then or before; a rollback's entry has the time the job went back, which may be earlier
        than that of the acknowledgements recorded before it (pushes applied before the reload)."""
        return [e for when, e in self.history if when <= t][-1]

    def push(self, r: dict) -> None:
        self.straddles += "straddle" in r
        if not r["ok"]:
            self.failed[r["err"]] += 1
            return
        self.acked += 1
        self.expected += 1
        self.history.append((r["t"], self.expected))
        self.acks.append(r["t"])
        if r["c"] != self.expected and len(self.mismatches) < 20:
            self.mismatches.append({"t": r["t"], "i": r["i"], "pulled": r["c"], "expected": self.expected})

    def roll_back(self, epoch: int, step: int, t: float) -> None:
        name = f"step-{step:08d}"
        before = min(self.heard.get(epoch, t), t)
        written = sorted(w for n, ts in self.writes.items() if n == name or n.startswith(f"{name}-") for w in ts
                         if w < before)
        if not written:
            self.unknown.append(name)
            return
        back = self.at(written[-1])
        refusals = [r for r in self.refused if written[-1] - REFUSAL_WINDOW < r < written[-1]]
        if refusals:
            self.uncertain += sum(1 for a in self.acks if refusals[0] < a <= written[-1])
        self.lost += self.expected - back
        self.expected = back
        # from when the job went back, not when this worker heard: it may hear late (waiting in a
        # checkpoint, stopped, dead), and a checkpoint written in between holds the state after it
        self.history.append((before, back))

    def catch_up(self, epoch: int, steps: dict[int, int], t: float) -> None:
        """Rollbacks up to ``epoch`` not replayed yet, in order (one heard late stands for those skipped)."""
        for e in range(self.epoch + 1, epoch + 1):
            if e in steps:
                self.roll_back(e, steps[e], t)
        self.epoch = max(self.epoch, epoch)


def replay(records: list[dict], writes: dict[str, list[float]], epochs: "Epochs", last_epoch: int) -> Ledger:
    ledger = Ledger(writes, epochs.heard)
    for r in records:
        if r["k"] == "s":
            ledger.sent += 1
        elif r["k"] == "p":
            ledger.push(r)
        elif r["k"] == "rb":
            ledger.catch_up(r["ep"], epochs.steps, r["t"])
        elif r["k"] == "registered":
            ledger.epoch = r["ep"]  # it joined after these rollbacks: none of them concerns it
        elif r["k"] == "ck" and REFUSED in r.get("msg", ""):
            ledger.refused.append(r["t"])
    ledger.catch_up(last_epoch, epochs.steps, math.inf)  # those it did not live to hear
    return ledger


@dataclass
class Epochs:
    """The job's rollbacks by epoch: the step it went back to, and when that was first heard of."""

    steps: dict[int, int] = field(default_factory=dict)
    heard: dict[int, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def add(self, epoch: int, step: int, t: float, source: str) -> None:
        if self.steps.setdefault(epoch, step) != step:
            self.problems.append(f"rollback epoch {epoch}: step {step} ({source}), elsewhere {self.steps[epoch]}")
        self.heard[epoch] = min(self.heard.get(epoch, math.inf), t)


def rollback_epochs(all_records: list[list[dict]], rollbacks: list[dict]) -> Epochs:
    """From the workers' records, and from the scheduler's log lines where those are one per epoch."""
    epochs = Epochs()
    for records in all_records:
        for r in records:
            if r["k"] == "rb":
                epochs.add(r["ep"], r["step"], r["t"], "as a worker heard it")
    if max(epochs.steps, default=0) <= len(rollbacks):
        for k, r in enumerate(rollbacks):
            epochs.add(k + 1, r["to_step"], r["t"], "as the scheduler logged it")
    return epochs


def log_time(stamp: str, t0: float) -> float:
    """A log line's asctime ('2026-01-01 12:00:00,123', local time) as seconds since t0."""
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp() - t0


def checkpoint_writes(scheduler_log: Path, t0: float) -> dict[str, list[float]]:
    writes: dict[str, list[float]] = {}
    for line in scheduler_log.read_text(errors="replace").splitlines():
        if m := WRITTEN.search(line):
            writes.setdefault(Path(m.group(2)).name, []).append(log_time(m.group(1), t0))
    return writes


def final_counts(all_records: list[list[dict]]) -> tuple[Optional[list[int]], list[str]]:
    """The servers' counts as the survivors read them at the end (they must agree)."""
    finals = [r for records in all_records for r in records if r["k"] == "final" and "counts" in r]
    problems = [f"survivors read different counts at the end (slots {i})" for i, f in enumerate(finals)
                if f["counts"] != finals[0]["counts"]]
    return (finals[0]["counts"] if finals else None), problems


def checkpoint_time(records: list[dict], start: float, end: float) -> float:
    """Seconds between ``start`` and ``end`` that a worker spent waiting in save_checkpoint."""
    total, began = 0.0, None
    for r in records:
        if r["k"] == "ck0":
            began = r["t"]
        elif r["k"] == "ck" and began is not None:
            total += max(0.0, min(r["t"], end) - max(began, start))
            began = None
    return total


def idle_spans(records: dict[int, list[dict]], since: float, until: float, longer: float = 1.0) -> list[tuple]:
    """Spans longer than ``longer`` seconds in which no worker completed a step: the whole job stalled."""
    times = sorted(r["t"] for rs in records.values() for r in rs if r["k"] == "p" and r["ok"])
    edges = [since] + [t for t in times if since <= t <= until] + [until]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b - a > longer]


__all__ = ["REFUSAL_WINDOW", "REFUSED", "Epochs", "Ledger", "checkpoint_time", "checkpoint_writes", "final_counts",
           "idle_spans", "log_time", "replay", "rollback_epochs"]
