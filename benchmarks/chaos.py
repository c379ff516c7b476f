"""Chaos: an async job with restartable servers and elastic workers, under random faults.

    python benchmarks/chaos.py                      # 4 workers, 3 servers, 180 s, a fault every ~6 s
    python benchmarks/chaos.py --quick              # 12 s, 3 workers, 2 servers (the smoke test's run)

Starts a LocalCluster (async, ``elastic``, ``restart_servers``, a checkpoint directory) and worker
processes (``_chaos_worker.py``: an MLP on scikit-learn's digits, a checkpoint at every multiple
of ``--ckpt-every`` seconds). Every ``--fault-every`` seconds (jittered) one random healthy target
gets a fault: a worker or a server is SIGKILLed, or SIGSTOPped and SIGCONTed after a random time
(sometimes longer than the heartbeat timeout). As ps-launch would, a killed server is restarted at
once and a server the scheduler declares dead is killed and restarted; a worker declared dead is
replaced by a new process (which takes its rank), and one that was stopped past its death is
continued, watched for a few seconds and killed.

Every worker process has a slot of its own in a ``counts`` tensor on the servers, so the servers
count exactly the pushes of each process that were applied and not rolled back. From the workers'
records of every push (acknowledged, or failed and why), the checkpoints they took part in and the
rollbacks they heard, it accounts for every push: acknowledged - lost in rollbacks == applied, per
slot (``_chaos_ledger.py``). A slot is ``exact`` when that holds to the push; ``balanced`` allows
only what its process could not know, each counted and reported: a killed process's push in flight,
pushes that failed in a process after the job had declared it dead, and pushes acknowledged while
a checkpoint that the job later went back to was taken without that process.

It reports the faults, that table, the longest stall of the surviving workers, how long no worker
completed a step, what the framework did wrong (``findings``), and the processes of the run left at
the end (found by an environment marker; must be 0); it writes ``--out``/chaos.json (with the
worker records and the cluster's logs beside it) and a plot of the training loss with the faults
marked (``--plot``). Exit code 1 if the accounting does not balance or a process is left.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import click

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: benchmarks/_common.py is importable
    sys.path.insert(0, str(ROOT))

from benchmarks._chaos_ledger import (REFUSAL_WINDOW, REFUSED, Ledger, checkpoint_time,  # noqa: E402
                                      checkpoint_writes, final_counts, idle_spans, log_time, replay,
                                      rollback_epochs)
from benchmarks._common import child_env, read_json_lines, tail  # noqa: E402

WORKER_SCRIPT = Path(__file__).resolve().parent / "_chaos_worker.py"
MARKER = "CHAOS_RUN_ID"  # in the environment of every process of a run (inherited by the cluster's)
SLOTS = 256  # worker processes a run can have: the size of the counts tensor
ZOMBIE_WATCH = 3.0  # seconds a worker continued after its death is watched before it is killed
REGISTER_TIMEOUT = 10.0  # seconds from a late worker's welcome to its activation on every server, or it is hung
JOIN_TIMEOUT = 60.0  # seconds from its first record (imports done) to registered, whatever happened
DEAD = re.compile(r"PS_DEAD role=(\w+) rank=(\d+) host=\S+ pid=(\d+) reason=(.*)")
REJOINED = re.compile(r"worker (\d+) on host \S+ \(pid (\d+)\) rejoined the job")
ACTIVATED = re.compile(r"worker (\d+) takes part again from the servers' next step")
ROLLED = re.compile(r"^(\S+ \S+) scheduler WARNING (the job rolled back (\d+) steps, from about step (\d+) to step "
                    r"(\d+): (.*) restarted, and every server reloaded (step-\d+(?:-\d+)?))")


@dataclass
class Options:
    seconds: float
    workers: int
    servers: int
    fault_every: float
    seed: int
    ckpt_every: float
    heartbeat_timeout: float
    quiet: float  # no faults in the last seconds, so that the end is clean
    lr: float
    out: Path
    plot: Path


@dataclass
class WorkerProc:
    """One worker process of the run, and what the driver knows of it."""

    slot: int
    popen: subprocess.Popen
    events: Path
    started: float
    state: str = "running"  # running, stopped, dead (declared by the scheduler), gone (exited or killed)
    began: Optional[float] = None  # its first record: imports done
    joined: Optional[float] = None  # when the scheduler logged its welcome (a late worker)
    activated: bool = False  # the scheduler logged that every server activated it (register() is answered)
    registered: Optional[float] = None
    rank: Optional[int] = None
    fatal: str = ""
    acks: int = 0
    loss: float = float("nan")
    fate: str = ""  # how it ended
    offset: int = 0  # bytes of its events read so far
    declared_dead: Optional[float] = None
    cont_at: Optional[float] = None  # when a stopped one is to be continued
    kill_at: Optional[float] = None  # when a continued dead one is to be killed

    @property
    def name(self) -> str:
        return f"w{self.rank}" if self.rank is not None else f"slot{self.slot}"

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class ServerProc:
    rank: int
    name: str
    popen: subprocess.Popen
    state: str = "running"  # running, stopped, restarting (until the job has rolled back)
    cont_at: Optional[float] = None


@dataclass
class Fault:
    t: float
    kind: str  # kill or stop
    target: str  # w2, s1
    pid: int
    seconds: float = 0.0  # how long it is stopped
    outcome: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}" + (f" {self.seconds:.1f}s" if self.kind == "stop" else "")


@dataclass
class Run:
    """What the driver holds during a run."""

    o: Options
    cluster: object
    console: object
    t0: float
    rng: random.Random
    env: dict
    workers: list[WorkerProc] = field(default_factory=list)
    servers: dict[int, ServerProc] = field(default_factory=dict)
    faults: list[Fault] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)  # the timeline: faults, deaths, restarts, rollbacks
    rollbacks: list[dict] = field(default_factory=list)
    skipped: int = 0  # fault times at which no target was healthy
    free: int = 0  # ranks of dead workers that no replacement was started for yet
    rejoined: dict[int, int] = field(default_factory=dict)  # pid -> rank, of workers that joined late
    sched_offset: int = 0
    job_ended: Optional[str] = None  # why no more workers are started: the job failed, or it is ending
    train_start: float = 0.0  # seconds after t0 when every first worker had registered
    stopped_at: float = math.inf  # when the stop file was written

    def now(self) -> float:
        return time.time() - self.t0

    def note(self, what: str, **fields) -> None:
        event = {"t": round(self.now(), 3), "what": what, **fields}
        self.events.append(event)
        self.console.log(f"[{event['t']:7.2f}] {what} " + " ".join(f"{k}={v}" for k, v in fields.items()))


# ----------------------------------------------------------------------------- processes


def start_worker(run: Run, rank: Optional[int]) -> WorkerProc:
    """A worker process in a slot of its own; a replacement (rank None) takes a dead worker's rank."""
    slot = len(run.workers)
    if slot >= SLOTS:
        raise click.ClickException(f"more than {SLOTS} worker processes: the counts tensor is full")
    events = run.o.out / "workers" / f"slot-{slot:03d}.jsonl"
    stderr = open(events.with_suffix(".stderr"), "wb")
    env = dict(run.env)
    if rank is not None:
        env["PS_RANK"] = str(rank)
    argv = [sys.executable, str(WORKER_SCRIPT), "--out", str(events), "--slot", str(slot), "--slots", str(SLOTS),
            "--stop-file", str(run.o.out / "STOP"), "--ckpt-dir", str(run.o.out / "ckpt"),
            "--ckpt-every", str(run.o.ckpt_every), "--t0", repr(run.t0), "--lr", str(run.o.lr)]
    from psframework.procs import spawn

    try:
        popen = spawn(argv, env, stdout=stderr, stderr=subprocess.STDOUT, cwd=str(ROOT))
    finally:
        stderr.close()
    proc = WorkerProc(slot, popen, events, run.now())
    run.workers.append(proc)
    run.note("worker started", slot=slot, pid=popen.pid, rank="any free" if rank is None else rank)
    return proc


def signal_pid(popen: subprocess.Popen, sig: int) -> None:
    try:
        popen.send_signal(sig)
    except ProcessLookupError:
        pass


def kill(popen: subprocess.Popen) -> None:
    signal_pid(popen, signal.SIGKILL)
    try:
        popen.wait(timeout=10)
    except subprocess.TimeoutExpired:  # a process in uninterruptible sleep: counted at the end
        pass


def restart_server(run: Run, rank: int, why: str) -> None:
    """As ps-launch --restart-failed-servers: a new process for the rank, at once."""
    name = run.cluster.restart_server(rank)
    run.servers[rank] = ServerProc(rank, name, run.cluster.processes()[name], state="restarting")
    run.note("server restarted", rank=rank, pid=run.servers[rank].popen.pid, why=why)


# ----------------------------------------------------------------------------- faults


def healthy_workers(run: Run) -> list[WorkerProc]:
    return [w for w in run.workers if w.state == "running" and w.registered is not None and w.alive()]


def targets(run: Run) -> list[tuple[str, object]]:
    """(kind, target) pairs a fault may hit now. A worker only while at least two others are healthy
    (so the job never runs out of workers); a server only while every server is healthy (one server
    fault, restart and rollback at a time)."""
    found: list[tuple[str, object]] = []
    healthy = healthy_workers(run)
    if len(healthy) >= 3:
        found += [(kind, w) for w in healthy for kind in ("kill", "stop")]
    if all(s.state == "running" for s in run.servers.values()):
        found += [(kind, s) for s in run.servers.values() for kind in ("kill", "stop")]
    return found


def inject(run: Run) -> None:
    """One fault on a random healthy target; a stop lasts up to twice the heartbeat timeout."""
    choices = targets(run)
    if not choices:
        run.skipped += 1
        run.note("fault skipped: no healthy target")
        return
    roles = sorted({type(t).__name__ for _, t in choices})
    role = run.rng.choice(roles)  # workers and servers equally often, whatever their numbers
    kind, target = run.rng.choice([c for c in choices if type(c[1]).__name__ == role])
    name = target.name if isinstance(target, WorkerProc) else f"s{target.rank}"
    fault = Fault(round(run.now(), 3), kind, name, target.popen.pid)
    run.faults.append(fault)
    if kind == "kill":
        kill(target.popen)
        if isinstance(target, WorkerProc):
            target.state, target.fate = "gone", "killed (fault)"
        else:
            restart_server(run, target.rank, "killed")
    else:
        fault.seconds = round(run.rng.uniform(0.3, 2 * run.o.heartbeat_timeout), 2)
        signal_pid(target.popen, signal.SIGSTOP)
        target.state, target.cont_at = "stopped", run.now() + fault.seconds
    run.note("FAULT " + fault.label, pid=fault.pid)


def continue_stopped(run: Run) -> None:
    """SIGCONT what is due; kill a continued worker that the job declared dead once it was watched."""
    now = run.now()
    for s in run.servers.values():
        if s.state == "stopped" and now >= s.cont_at:
            signal_pid(s.popen, signal.SIGCONT)
            s.state = "running"
            run.note("server continued", rank=s.rank, pid=s.popen.pid)
    for w in run.workers:
        if w.state in ("stopped", "dead") and w.cont_at is not None and now >= w.cont_at:
            signal_pid(w.popen, signal.SIGCONT)
            w.cont_at = None
            if w.state == "stopped":
                w.state = "running"
                run.note("worker continued", slot=w.slot, pid=w.popen.pid)
            else:
                w.kill_at = now + ZOMBIE_WATCH
                run.note("worker continued after it was declared dead", slot=w.slot, pid=w.popen.pid)
        if w.kill_at is not None and now >= w.kill_at:
            w.kill_at = None
            if w.alive():
                kill(w.popen)
                w.fate = "continued after its death: killed"
                run.note("dead worker killed", slot=w.slot, pid=w.popen.pid)
            w.state = "gone"


# ----------------------------------------------------------------------------- what the processes say


def read_scheduler(run: Run) -> None:
    """New lines of the scheduler's log: deaths it declared, rollbacks it finished."""
    path = run.cluster.log_dir / "scheduler.log"
    with open(path, "rb") as f:
        f.seek(run.sched_offset)
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    run.sched_offset += len(complete)
    for line in complete.decode(errors="replace").splitlines():
        if m := DEAD.search(line):
            on_dead(run, m.group(1), int(m.group(2)), int(m.group(3)), m.group(4))
        elif m := REJOINED.search(line):
            run.rejoined[int(m.group(2))] = int(m.group(1))
            for w in run.workers:
                if w.popen.pid == int(m.group(2)):
                    w.joined = run.now()
        elif m := ACTIVATED.search(line):
            for w in run.workers:  # the one that holds that rank and waits for it
                if w.joined is not None and run.rejoined.get(w.popen.pid) == int(m.group(1)):
                    w.activated = True
        elif m := ROLLED.search(line):
            on_rolled_back(run, m)


def on_dead(run: Run, role: str, rank: int, pid: int, reason: str) -> None:
    run.note("scheduler: dead", role=role, rank=rank, pid=pid, reason=reason)
    if role == "server":
        s = run.servers.get(rank)
        if s is not None and s.popen.pid == pid and s.popen.poll() is None:  # stopped (or hung): as ps-launch
            kill(s.popen)
            restart_server(run, rank, "declared dead")
        return
    w = next((w for w in run.workers if w.popen.pid == pid), None)
    if w is None:
        return
    w.declared_dead = run.now()
    if w.state == "stopped":
        w.state = "dead"  # continued when its stop is over, then watched and killed
    elif w.alive() and w.state == "running":
        w.state, w.kill_at = "dead", run.now() + ZOMBIE_WATCH  # declared dead while running: watched, killed
    run.free += 1  # its rank is free now: a replacement takes it


def on_rolled_back(run: Run, m: re.Match) -> None:
    servers = [int(r) for r in re.findall(r"server (\d+)", m.group(6))]
    record = {"t": round(log_time(m.group(1), run.t0), 3), "seen": round(run.now(), 3), "steps": int(m.group(3)),
              "from_step": int(m.group(4)), "to_step": int(m.group(5)), "servers": servers,
              "checkpoint": m.group(7)}
    run.rollbacks.append(record)
    run.note("scheduler: " + m.group(2))
    for rank in servers:
        if run.servers[rank].state == "restarting":
            run.servers[rank].state = "running"


def read_worker_events(run: Run) -> None:
    """New records of every worker: registration, acknowledged pushes, the last loss."""
    for w in run.workers:
        if not w.events.exists():
            continue
        with open(w.events, "rb") as f:
            f.seek(w.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        w.offset += len(complete)
        for line in complete.splitlines():
            r = json.loads(line)
            if r["k"] == "start":
                w.began = r["t"]
            elif r["k"] in ("joined", "registered"):
                w.rank = r["rank"]
                if r["k"] == "registered":
                    w.registered = r["t"]
            elif r["k"] == "fatal":
                w.fatal = f"{r['where']}: {r['err']}: {r['msg']}"
            elif r["k"] == "p" and r["ok"]:
                w.acks += 1
                w.loss = r["loss"]


def check_exits(run: Run) -> None:
    """Workers that exited by themselves."""
    for w in run.workers:
        if w.state == "gone" or w.alive():
            continue
        code = w.popen.returncode
        if not w.fate:
            w.fate = "survived" if code == 0 else f"exited (code {code})"
            if w.fatal:
                w.fate += f" after {w.fatal.split(':')[1].strip()}"  # the error's type
        run.note("worker exited", slot=w.slot, pid=w.popen.pid, code=code, fatal=w.fatal[:200])
        if w.registered is None and w.declared_dead is None:
            lost_joiner(run, w)
        w.state = "gone"


def check_joiners(run: Run) -> None:
    """A late worker that the scheduler has not activated on every server REGISTER_TIMEOUT after its
    welcome waits in register() for an answer that will not come: killed (so is any worker not
    registered JOIN_TIMEOUT after its imports)."""
    for w in run.workers:
        if w.state != "running" or w.registered is not None or w.began is None or not w.alive():
            continue
        if (w.joined is not None and not w.activated and run.now() - w.joined > REGISTER_TIMEOUT) \
                or run.now() - w.began > JOIN_TIMEOUT:
            kill(w.popen)
            w.state, w.fate = "gone", "register hung: killed"
            run.note("REGISTER HUNG: worker killed", slot=w.slot, pid=w.popen.pid,
                     rank=run.rejoined.get(w.popen.pid))
            lost_joiner(run, w)


def lost_joiner(run: Run, w: WorkerProc) -> None:
    """A worker gone before it registered: if the scheduler gave it a rank, that rank's death will be
    declared (and replaced); if not, the rank it was to take is still free."""
    if w.popen.pid in run.rejoined or w.rank is not None or w.slot < run.o.workers:
        return
    if "no free worker slot" in w.fatal:
        run.note("a replacement found no free rank", slot=w.slot)  # the driver miscounted: not retried
        return
    run.free += 1


def replace_dead(run: Run) -> None:
    while run.free > 0 and run.job_ended is None:
        run.free -= 1
        start_worker(run, None)
    scheduler = run.cluster.processes()["scheduler"]
    if scheduler.poll() is not None and run.job_ended is None:
        run.job_ended = f"the scheduler exited (code {scheduler.returncode})"
        run.note("JOB ENDED", why=run.job_ended)


def tick(run: Run) -> None:
    read_scheduler(run)
    read_worker_events(run)
    continue_stopped(run)
    check_exits(run)
    check_joiners(run)
    replace_dead(run)


# ----------------------------------------------------------------------------- the phases of a run


def wait_registered(run: Run, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.registered is not None for w in run.workers):
        tick(run)
        if run.job_ended or any(w.state == "gone" for w in run.workers) or time.monotonic() > deadline:
            tails = "\n".join(tail(w.events.with_suffix(".stderr")) for w in run.workers)
            raise click.ClickException(f"the workers did not all register within {timeout:g} s:\n{tails}")
        time.sleep(0.1)


def chaos(run: Run, progress, task) -> None:
    """Faults at jittered intervals until ``quiet`` seconds before the end."""
    o = run.o
    end, last = run.train_start + o.seconds, run.train_start + o.seconds - o.quiet
    next_fault = run.train_start + o.fault_every * run.rng.uniform(0.5, 1.5)
    while run.now() < end and run.job_ended is None:
        tick(run)
        if next_fault <= run.now() < last:
            inject(run)
            next_fault += o.fault_every * run.rng.uniform(0.5, 1.5)
        live = len(healthy_workers(run))
        progress.update(task, completed=min(o.seconds, run.now() - run.train_start),
                        description=f"faults {len(run.faults):3d}  rollbacks {len(run.rollbacks):2d}  "
                                    f"pushes acked {sum(w.acks for w in run.workers):7d}  "
                                    f"healthy workers {live}  loss {mean_loss(run):.3f}")
        time.sleep(0.05)


def mean_loss(run: Run) -> float:
    losses = [w.loss for w in healthy_workers(run) if not math.isnan(w.loss)]
    return sum(losses) / len(losses) if losses else float("nan")


def settled(run: Run) -> bool:
    """Nothing stopped, restarting or joining: the end can be clean."""
    workers = [w for w in run.workers if w.state != "gone"]
    return (all(s.state == "running" for s in run.servers.values())
            and all(w.state == "running" and w.registered is not None for w in workers))


def finish_workers(run: Run, timeout: float) -> None:
    """Wait until settled, write the stop file (atomically: every worker reads the same time), and
    wait for the workers to finish; kill those that do not (recorded)."""
    deadline = time.monotonic() + timeout
    while not settled(run) and time.monotonic() < deadline and run.job_ended is None:
        tick(run)
        time.sleep(0.05)
    if not settled(run):
        run.note("the job did not settle before the end", workers={w.slot: w.state for w in run.workers
                                                                      if w.state != "gone"})
    stop = run.o.out / "STOP"
    stop.with_suffix(".tmp").write_text(repr(time.time()))
    os.replace(stop.with_suffix(".tmp"), stop)
    run.job_ended = run.job_ended or "stopped"
    run.stopped_at = run.now()
    run.note("stop file written")
    deadline = time.monotonic() + run.o.ckpt_every + timeout
    while any(w.alive() for w in run.workers) and time.monotonic() < deadline:
        tick(run)
        time.sleep(0.05)
    tick(run)
    for w in run.workers:
        if w.alive():
            kill(w.popen)
            w.fate, w.state = "did not finish: killed", "gone"
            run.note("worker killed at the end", slot=w.slot, pid=w.popen.pid)
        elif not w.fate:
            w.fate = "survived" if w.popen.returncode == 0 else f"exited (code {w.popen.returncode})"


def finish_cluster(run: Run, timeout: float) -> dict:
    """Let the scheduler and servers end by themselves, then count the run's processes still alive;
    stop the cluster and kill whatever is left by the marker, counting again."""
    from psframework.errors import PSTimeoutError

    try:
        codes = run.cluster.wait(timeout=timeout)
    except PSTimeoutError as exc:
        codes = {n: p.poll() for n, p in run.cluster.processes().items()}
        run.note("the cluster did not end by itself", error=str(exc).splitlines()[0])
    left = run_processes(run.env[MARKER])
    run.cluster.stop()
    for pid, _ in run_processes(run.env[MARKER]):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(0.5)
    after = run_processes(run.env[MARKER])
    return {"exit_codes": codes, "left_after_the_job_ended": left, "left_after_cleanup": after}


def run_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process with MARKER=marker in its environment (not zombies)."""
    key = f"{MARKER}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if key not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z":
            found.append((int(entry.name), cmdline.strip()))
    return found


# ----------------------------------------------------------------------------- accounting


def account(run: Run, records: dict[int, list[dict]]) -> dict:
    """Every push of every worker process: sent, acknowledged, failed (by error), unresolved (in
    flight when it was killed), lost in rollbacks, and what the servers applied; per slot and in all."""
    writes = checkpoint_writes(run.o.out / "logs" / "scheduler.log", run.t0)
    epochs = rollback_epochs(list(records.values()), run.rollbacks)
    problems = list(epochs.problems)
    notes = [f"checkpoint {n} written {len(ts)} times" for n, ts in writes.items() if len(ts) > 1]
    seen = [r["ep"] for rs in records.values() for r in rs if r["k"] in ("p", "rb", "registered")]
    counts, more = final_counts(list(records.values()))
    problems += more
    rows = []
    for w in run.workers:
        ledger = replay(records[w.slot], writes, epochs, max(seen + list(epochs.steps), default=0))
        survivor = any(r["k"] == "final" and "counts" in r for r in records[w.slot])
        rows.append(slot_row(w, records[w.slot], ledger, counts, survivor))
        problems += [f"slot {w.slot}: rollback to {n}, which was not written before" for n in ledger.unknown]
    if counts is None:
        problems.append("no survivor read the counts at the end")
    elif any(counts[len(run.workers):]):
        problems.append("counts of slots no process had are not 0")
    keys = ("sent", "acked", "failed", "unresolved", "lost", "expected", "applied")
    totals = {k: sum(r[k] or 0 for r in rows) for k in keys}
    totals["failed_by_error"] = dict(sum((Counter(r["failed_by_error"]) for r in rows), Counter()))
    balanced = counts is not None and all(r["balanced"] for r in rows) and not problems
    totals["applied_though_failed"] = sum(r["applied_though_failed"] for r in rows)
    totals["uncertain"] = sum(r["uncertain"] for r in rows)
    return {"slots": rows, "totals": totals, "balanced": balanced, "problems": problems, "notes": notes,
            "writes": writes,
            "exact": balanced and all(r["exact"] or (not r["survivor"] and 0 <= r["diff"] <= r["unresolved"])
                                      for r in rows),
            "rollback_steps": epochs.steps, "checkpoints_written": sum(len(ts) for ts in writes.values())}


def slot_row(w: WorkerProc, records: list[dict], ledger: Ledger, counts: Optional[list[int]],
             survivor: bool) -> dict:
    """One slot's line of the table. ``exact``: applied == acked - lost. Otherwise ``balanced`` only
    where the difference is what the process cannot know: a killed one's push in flight; for one the
    job declared dead, pushes that failed after that (the servers may have applied them); pushes
    acknowledged while a checkpoint that the job went back to was taken without it (``uncertain``)."""
    failed = sum(ledger.failed.values())
    unresolved = ledger.sent - ledger.acked - failed
    applied = counts[w.slot] if counts is not None else None
    diff = None if applied is None else applied - ledger.expected
    dead = w.declared_dead if w.declared_dead is not None else math.inf
    failed_dead = sum(1 for r in records if r["k"] == "p" and not r["ok"] and r["t"] > dead)
    sent_at = {r["i"]: r["t"] for r in records if r["k"] == "s"}
    acked_dead = [sent_at.get(r["i"], 0.0) for r in records if r["k"] == "p" and r["ok"] and r["t"] > dead]
    high = 0 if survivor else unresolved + failed_dead
    explained = diff is not None and -ledger.uncertain <= diff <= high
    return {"slot": w.slot, "rank": w.rank, "pid": w.popen.pid, "fate": w.fate, "survivor": survivor,
            "sent": ledger.sent, "acked": ledger.acked, "failed": failed, "failed_by_error": dict(ledger.failed),
            "unresolved": unresolved, "lost": ledger.lost, "expected": ledger.expected, "applied": applied,
            "diff": diff, "exact": diff == 0, "balanced": diff == 0 or explained,
            "declared_dead_at": None if w.declared_dead is None else round(w.declared_dead, 3),
            "failed_after_declared_dead": failed_dead, "acked_after_declared_dead": len(acked_dead),
            "sent_and_acked_after_declared_dead": sum(1 for t in acked_dead if t > dead),
            "applied_though_failed": max(0, (diff or 0) - unresolved) if explained else 0,
            "uncertain": ledger.uncertain, "refused_checkpoints": len(ledger.refused),
            "straddles": ledger.straddles, "first_mismatch": ledger.mismatches[0] if ledger.mismatches else None}


def stalls(run: Run, records: dict[int, list[dict]]) -> list[dict]:
    """For each surviving worker: the longest time between two completed steps (from registering until
    the stop file was written), how much of it went by in checkpoints, and the faults around it."""
    found = []
    for w in run.workers:
        rs = records[w.slot]
        if not any(r["k"] == "final" and "counts" in r for r in rs) or w.registered is None:
            continue
        end = min([run.stopped_at] + [r["t"] for r in rs if r["k"] == "final"])  # stalled at the end too
        times = [w.registered] + [r["t"] for r in rs if r["k"] == "p" and r["ok"] and r["t"] < end] + [end]
        gap, start = max((b - a, a) for a, b in zip(times, times[1:]))
        near = [f.label for f in run.faults if start - run.o.heartbeat_timeout * 2 <= f.t <= start + gap]
        found.append({"slot": w.slot, "rank": w.rank, "seconds": round(gap, 3),
                      "from": round(start - run.train_start, 2), "faults_around": near,
                      "in_checkpoints": round(checkpoint_time(rs, start, start + gap), 3)})
    return sorted(found, key=lambda s: -s["seconds"])


def findings(run: Run, accounting: dict, records: dict[int, list[dict]]) -> list[str]:
    """What the framework did that it should not have, as the run saw it; times in seconds since
    training began (in the JSON, ``t`` is seconds since the cluster started). (A push sent before its
    worker was stopped and answered after the worker was declared dead is no finding: the servers
    applied it while the worker was alive.)"""
    found = []
    hung = [e for e in run.events if e["what"].startswith("REGISTER HUNG")]
    if hung:
        found.append(f"{len(hung)} of {len(run.workers) - run.o.workers} replacement workers were not activated "
                     f"within {REGISTER_TIMEOUT:g} s of their welcome, so register() never returned (then killed); "
                     "meanwhile every checkpoint waited for them")
    for r in accounting["slots"]:
        if r["applied_though_failed"]:
            found.append(f"slot {r['slot']} (rank {r['rank']}, declared dead at "
                         f"{r['declared_dead_at'] - run.train_start:.1f} s): "
                         f"{r['applied_though_failed']} push(es) failed in the worker but were applied by the servers")
        if r["sent_and_acked_after_declared_dead"]:
            found.append(f"slot {r['slot']}: {r['sent_and_acked_after_declared_dead']} push(es) sent and acknowledged "
                         "after the scheduler had declared the process dead")
        if r["uncertain"]:
            found.append(f"slot {r['slot']}: {r['uncertain']} acknowledged push(es) may or may not be in a checkpoint "
                         "that was taken without it and that the job went back to")
    return found + checkpoint_findings(run, accounting["writes"], records)


def across_rollbacks(run: Run, writes: dict[str, list[float]], records: dict[int, list[dict]]) -> list[str]:
    """Checkpoints whose workers handed in their parts before a rollback and that were written after
    it: named after the steps the workers had reached, they hold the state the job went back to."""
    names = set()
    for rs in records.values():
        began = None
        for r in rs:
            if r["k"] == "ck0":
                began = r["t"]
            elif r["k"] == "ck" and "path" in r and began is not None:
                written = max((w for w in writes.get(r["path"], []) if w <= r["t"] + 0.5), default=r["t"])
                step = int(r["path"].split("-")[1])
                names.update(f"{r['path']} (the job went back to step {rb['to_step']} at "
                             f"{rb['t'] - run.train_start:.1f} s)"
                             for rb in run.rollbacks if began < rb["t"] < written and rb["to_step"] != step)
    if not names:
        return []
    return [f"{len(names)} checkpoint(s) collected before a rollback and written after it, named after the step the "
            f"workers had reached before it but holding the state after it: {'; '.join(sorted(names)[:6])}"]


def checkpoint_findings(run: Run, writes: dict[str, list[float]], records: dict[int, list[dict]]) -> list[str]:
    """Checkpoints that started without a live worker (its part refused, then written at once), and
    refusals that no write followed: a checkpoint operation that never ended."""
    times = sorted(t for ts in writes.values() for t in ts)
    dead = {w.slot: (w.declared_dead if w.declared_dead is not None else math.inf) for w in run.workers}
    without, stuck = [], []
    for slot, rs in records.items():
        for r in rs:
            if r["k"] == "ck" and REFUSED in r.get("msg", "") and r["t"] < dead[slot]:
                soon = [t for t in times if r["t"] < t < r["t"] + REFUSAL_WINDOW]
                (without if soon else stuck).append((slot, r["t"]))
    found = across_rollbacks(run, writes, records)
    if without:
        found.append(f"{len(without)} checkpoint(s) started without a live worker's part (refused: '{REFUSED}', "
                     f"then written within {REFUSAL_WINDOW:g} s): " +
                     ", ".join(f"slot {s} at {t - run.train_start:.1f} s" for s, t in without[:6]))
    if stuck:
        gaps = [(b - a, a) for a, b in zip(times, times[1:] + [run.stopped_at])]
        gap, since = max(gaps) if gaps else (0.0, 0.0)
        found.append(f"{len(stuck)} checkpoint part(s) of live workers refused with '{REFUSED}' and no checkpoint "
                     f"written soon after; the longest time without a checkpoint was {gap:.1f} s, from "
                     f"{since - run.train_start:.1f} s")
    return found


# ----------------------------------------------------------------------------- the report


def fault_summary(run: Run) -> dict:
    """Faults by kind; a stop counts as 'declared dead' if the scheduler declared its process dead
    while it was stopped (or just after: the heartbeats it missed were already late)."""
    deaths = [(e["pid"], e["t"]) for e in run.events if e["what"] == "scheduler: dead"]
    kinds: Counter = Counter()
    for f in run.faults:
        role = "worker" if f.target.startswith("w") else "server"
        dead = any(pid == f.pid and f.t <= t <= f.t + f.seconds + 0.5 for pid, t in deaths)
        f.outcome = ("declared dead" if dead else "continued in time") if f.kind == "stop" else ""
        kinds[f"{f.kind} {role}" + (f" ({f.outcome})" if f.outcome else "")] += 1
    return {"total": len(run.faults), "by_kind": dict(sorted(kinds.items())), "skipped": run.skipped}


def print_report(run: Run, results: dict) -> None:
    from rich.table import Table

    console, acc = run.console, results["accounting"]
    faults = Table(title=f"{results['faults']['total']} faults injected")
    faults.add_column("kind")
    faults.add_column("count", justify="right")
    for kind, n in results["faults"]["by_kind"].items():
        faults.add_row(kind, str(n))
    console.print(faults)
    table = Table(title="every push accounted for (slot = one worker process)")
    for column in ("slot", "rank", "fate", "sent", "acked", "failed", "in flight", "lost", "acked - lost",
                   "applied", "balanced"):
        table.add_column(column, justify="left" if column == "fate" else "right")
    for r in acc["slots"] + [{"slot": "all", "rank": "", "fate": "", **acc["totals"], "unresolved":
                              acc["totals"]["unresolved"], "balanced": acc["balanced"]}]:
        table.add_row(str(r["slot"]), str(r["rank"]), r["fate"], str(r["sent"]), str(r["acked"]),
                      str(r["failed"]), str(r["unresolved"]), str(r["lost"]), str(r["expected"]),
                      str(r["applied"]), verdict(r))
    console.print(table)
    console.print(f"failed pushes by error: {acc['totals']['failed_by_error']}")
    idle = results["job_idle"]
    console.print(f"no worker completed a step for {idle['seconds']} s of {run.o.seconds:g} s "
                  f"({idle['spans']} spans over 1 s, the longest {idle['longest']} s)")
    for finding in results["findings"]:
        console.print(f"[yellow]finding:[/yellow] {finding}")
    for problem in acc["problems"]:
        console.print(f"[red]problem:[/red] {problem}")
    for note in acc["notes"]:
        console.print(f"note: {note}")
    if results["stalls"]:
        s = results["stalls"][0]
        console.print(f"longest stall of a surviving worker: {s['seconds']:.2f} s (slot {s['slot']}, rank "
                      f"{s['rank']}, from t={s['from']} s, {s['in_checkpoints']:.1f} s of it in checkpoints; "
                      f"faults around it: {', '.join(s['faults_around'])})")
    ends = results["processes"]
    console.print(f"processes of the run left after the job ended: {len(ends['left_after_the_job_ended'])}; "
                  f"after cleanup: {len(ends['left_after_cleanup'])}")
    console.print(f"final held-out accuracy {results.get('test_acc')}, loss {results.get('test_loss')}")


def verdict(row: dict) -> str:
    if "slot" in row and row["slot"] == "all":
        return "yes" if row["balanced"] else "NO"
    if row["exact"]:
        return "exact"
    if row["balanced"] and row["diff"] < 0:
        return f"{row['diff']} not in a cut"
    if row["balanced"]:
        return f"+{row['diff']} in flight" if row["diff"] <= row["unresolved"] else f"+{row['diff']} failed, applied"
    return f"NO ({row['diff']:+d})" if row["diff"] is not None else "NO"


def plot(run: Run, records: dict[int, list[dict]], idle: list[tuple], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 5))
    points = sorted((r["t"] - run.train_start, r["loss"]) for rs in records.values() for r in rs if r["k"] == "p")
    for rs in records.values():
        mine = [(r["t"] - run.train_start, r["loss"]) for r in rs if r["k"] == "p"]
        if len(mine) > 20:
            ts, smooth = [t for t, _ in mine], moving_mean([v for _, v in mine], 25)
            for i in range(len(ts) - 1, 0, -1):  # no line across a stall
                if ts[i] - ts[i - 1] > 1.0:
                    ts.insert(i, math.nan), smooth.insert(i, math.nan)
            ax.plot(ts, smooth, lw=0.5, alpha=0.35)
    for a, b in idle:
        ax.axvspan(a - run.train_start, b - run.train_start, color="0.9", lw=0)
    bins: dict[int, list[float]] = {}
    for t, loss in points:
        bins.setdefault(int(t), []).append(loss)
    seconds = range(min(bins, default=0), max(bins, default=0) + 1)  # a second without a step: a gap
    ax.plot([b + 0.5 for b in seconds], [sum(bins[b]) / len(bins[b]) if b in bins else math.nan for b in seconds],
            color="black", lw=1.6, label="mean over workers, 1 s bins (gaps: no step done)")
    top = max([v for _, v in points] or [1.0])
    colors = {"kill": "tab:red", "stop": "tab:orange"}
    for f in run.faults:
        t = f.t - run.train_start
        ax.axvline(t, color=colors[f.kind], lw=0.8, ls="-" if f.kind == "kill" else "--")
        ax.text(t, top, " " + f.label, rotation=90, va="top", ha="right", fontsize=7, color=colors[f.kind])
    for rb in run.rollbacks:
        ax.axvline(rb["t"] - run.train_start, color="tab:purple", lw=1.2, ls=":")
    if run.stopped_at < math.inf:
        ax.axvline(run.stopped_at - run.train_start, color="0.4", lw=1.0, ls="-.")
        ax.text(run.stopped_at - run.train_start, top, " stop file", rotation=90, va="top", ha="right", fontsize=7)
    ax.plot([], [], color="tab:red", label="SIGKILL"), ax.plot([], [], color="tab:orange", ls="--",
                                                                 label="SIGSTOP (for the time shown)")
    ax.plot([], [], color="tab:purple", ls=":", label="rollback to a checkpoint done")
    ax.fill_between([], [], color="0.9", label="no worker completed a step (> 1 s)")
    ax.set_xlabel("seconds since every worker registered")
    ax.set_ylabel("training loss (cross entropy)")
    ax.set_title(title, fontsize=10)
    ax.set_yscale("log")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def moving_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


# ----------------------------------------------------------------------------- main


def prepare(out: Path) -> None:
    for sub in ("workers", "ckpt", "logs"):
        shutil.rmtree(out / sub, ignore_errors=True)
    (out / "STOP").unlink(missing_ok=True)
    (out / "workers").mkdir(parents=True)


def drive(run: Run) -> dict:
    """Start the workers, inject faults, end the job; returns how the processes ended."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    run.servers = {r: ServerProc(r, f"server-{r}", p) for r in range(run.o.servers)
                   for n, p in run.cluster.processes().items() if n == f"server-{r}"}
    for rank in range(run.o.workers):
        start_worker(run, rank)
    wait_registered(run, timeout=180)
    run.train_start = run.now()
    run.note("every worker registered: training")
    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=run.console, transient=False) as progress:
        task = progress.add_task("starting", total=run.o.seconds)
        chaos(run, progress, task)
    finish_workers(run, timeout=60)
    return finish_cluster(run, timeout=30)


def cleanup(run: Run) -> None:
    """Whatever happened: no worker and no cluster process outlives the run; keep the logs."""
    for w in run.workers:
        if w.alive():
            signal_pid(w.popen, signal.SIGCONT)
            kill(w.popen)
    run.cluster.stop()
    shutil.copytree(run.cluster.log_dir, run.o.out / "logs", dirs_exist_ok=True)
    shutil.rmtree(run.cluster.log_dir, ignore_errors=True)


def results_of(run: Run, processes: dict) -> dict:
    records = {w.slot: read_json_lines(w.events) for w in run.workers}
    finals = [r for rs in records.values() for r in rs if r["k"] == "final" and "counts" in r]
    accounting = account(run, records)
    idle = idle_spans(records, run.train_start, run.train_start + run.o.seconds)
    results = {"options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(run.o).items()},
               "machine": f"{os.cpu_count()} cores", "t0": run.t0, "train_start": run.train_start,
               "faults": fault_summary(run), "accounting": accounting, "stalls": stalls(run, records),
               "job_idle": {"seconds": round(sum(b - a for a, b in idle), 2), "spans": len(idle),
                            "longest": round(max((b - a for a, b in idle), default=0.0), 2),
                            "list": [(round(a - run.train_start, 2), round(b - run.train_start, 2)) for a, b in idle]},
               "findings": findings(run, accounting, records), "replacements": len(run.workers) - run.o.workers,
               "processes": processes, "rollbacks": run.rollbacks, "job_ended": run.job_ended,
               "test_acc": finals[0]["test_acc"] if finals else None,
               "test_loss": finals[0]["test_loss"] if finals else None,
               "fault_list": [vars(f) for f in run.faults], "events": run.events}
    title = (f"chaos: {run.o.workers} async workers, {run.o.servers} servers, {len(run.faults)} faults, "
             f"{len(run.rollbacks)} rollbacks; accounting "
             f"{'balanced' if results['accounting']['balanced'] else 'NOT balanced'}")
    plot(run, records, idle, run.o.plot, title)
    return results


@click.command()
@click.option("--seconds", default=180.0, show_default=True, help="training time under faults")
@click.option("--workers", default=4, show_default=True)
@click.option("--servers", default=3, show_default=True)
@click.option("--fault-every", default=6.0, show_default=True, help="mean seconds between faults (x0.5-1.5)")
@click.option("--seed", default=0, show_default=True)
@click.option("--ckpt-every", default=3.0, show_default=True, help="seconds between checkpoints")
@click.option("--heartbeat-timeout", default=3.0, show_default=True, help="seconds; heartbeats every 1/8 of it")
@click.option("--lr", default=0.003, show_default=True, help="the workers' SGD step (small: the loss falls all run)")
@click.option("--quick", is_flag=True, help="3 workers, 2 servers, 12 s, a fault every ~2.5 s, heartbeat "
              "timeout 2 s: the smoke test")
@click.option("--out", default=str(ROOT / "benchmarks" / "out" / "chaos"), show_default=True)
@click.option("--plot", "plot_path", default=str(ROOT / "benchmarks" / "chaos.png"), show_default=True)
def main(seconds: float, workers: int, servers: int, fault_every: float, seed: int, ckpt_every: float,
         heartbeat_timeout: float, lr: float, quick: bool, out: str, plot_path: str) -> None:
    from rich.console import Console

    import psframework as ps
    from psframework.config import Timing

    if quick:
        seconds, fault_every, workers, servers, heartbeat_timeout = 12.0, 2.5, 3, 2, 2.0
    o = Options(seconds, workers, servers, fault_every, seed, ckpt_every, heartbeat_timeout,
                quiet=2 * heartbeat_timeout, lr=lr, out=Path(out), plot=Path(plot_path))
    prepare(o.out)
    marker = uuid.uuid4().hex
    os.environ[MARKER] = marker  # the cluster's processes inherit it; the workers get it in run.env
    timing = Timing(heartbeat_interval=heartbeat_timeout / 8, heartbeat_timeout=heartbeat_timeout)
    cluster = ps.LocalCluster(num_servers=servers, num_workers=workers, mode="async", elastic=True,
                              restart_servers=True, checkpoint_dir=str(o.out / "ckpt"), timing=timing)
    console = Console() if sys.stdout.isatty() else Console(width=140)  # tables stay readable in a log
    run = Run(o, cluster, console, time.time(), random.Random(seed), {})
    try:
        cluster.start()
        run.env = {**cluster.env(), **child_env(), MARKER: marker}
        processes = drive(run)
    finally:
        cleanup(run)
    processes["left_at_exit"] = run_processes(marker)
    results = results_of(run, processes)
    (o.out / "chaos.json").write_text(json.dumps(results, indent=1))
    print_report(run, results)
    run.console.print(f"raw: {o.out / 'chaos.json'}\nplot: {o.plot}")
    if not results["accounting"]["balanced"] or processes["left_after_the_job_ended"] or processes["left_at_exit"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
