"""The owner of a job's processes: start them in order, watch them, stop them all, say what went wrong.

``run_job(cfg)`` starts the scheduler, learns its address from its ``PS_SCHEDULER_ADDRESS=`` line,
starts the servers and the workers, then watches:

* every worker exited 0: the scheduler and servers stop by themselves (we wait, with a deadline);
  the job succeeded (exit 0);
* any process exited non-zero or was killed: that first failure is the root cause; every other
  process is stopped and the report names it first, with its last lines (exit 1);
* the cluster did not come up within the start timeout: the report names the processes that never
  registered with the scheduler (exit 1);
* SIGINT, SIGTERM or SIGHUP: everything is stopped (exit 128 + signal);
* the scheduler declared a process dead (``PS_DEAD``: no heartbeat, e.g. a stopped or frozen
  process): it is ended, and counts as failed from then on, whatever its exit code (an elastic
  worker is lost, a restartable server restarted, anything else fails the job with it as the root
  cause: ``declared dead: no heartbeat for 4.1 s (state: stopped)``).

In every case every process is stopped before ``run_job`` returns (SIGTERM with SIGCONT, then
SIGKILL after ``--stop-grace``; ``stopping.py``), every reader thread is joined, and the report
names the processes that only SIGKILL could end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

from .commands import ProcessSpec, host_addresses, node_processes, scheduler_process
from .config import LaunchConfig
from .process import Console, JobProcess
from .secret_files import SecretFiles
from .stopping import TICK, Stopper
from ..errors import ConfigError
from ..trace import merge

DRAIN_TIMEOUT = 10.0   # scheduler and servers end by themselves once the workers are done
SHOWN_LINES = 20
SETTLE = 2.0           # how long a secondary failure waits for its root cause to exit
SECONDARY_ERROR = "PeerLostError"
EXIT_FAILED = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_JOINED_RE = re.compile(r"PS_JOINED role=(\w+) rank=(\S+) host=(\S+)")
_SUMMARY_RE = re.compile(r"PS_SUMMARY steps=(\d+) bytes=(\d+)")
_DEAD_RE = re.compile(r"PS_DEAD role=(\w+) rank=(\d+) host=(\S+) pid=(\d+) reason=(.*)")


def run_job(cfg: LaunchConfig, console: Optional[Console] = None) -> int:
    """Run the job described by ``cfg``; returns ps-launch's exit code."""
    job = Job(cfg, console or Console())
    with _stop_signals(job.request_stop):
        return job.run()


@dataclass(frozen=True)
class Death:
    """A node the scheduler declared dead (its ``PS_DEAD`` line)."""

    role: str
    rank: int
    host: str
    pid: int
    reason: str


class SchedulerWatch:
    """What the scheduler says on stdout: where it listens, who joined, whether everyone did, who
    it declared dead."""

    def __init__(self) -> None:
        self.address: Optional[str] = None
        self.metrics_address: Optional[str] = None
        self.summary: Optional[tuple[int, int]] = None  # the workers' steps, the bytes the servers moved
        self.joined: list[tuple[str, Optional[int], str]] = []
        self.up = threading.Event()
        self._lock = threading.Lock()
        self._deaths: list[Death] = []

    def on_line(self, proc: JobProcess, text: str) -> None:
        if text.startswith("PS_SCHEDULER_ADDRESS="):
            self.address = text.split("=", 1)[1].strip()
        elif text.startswith("PS_METRICS_ADDRESS="):
            self.metrics_address = text.split("=", 1)[1].strip()
        elif match := _SUMMARY_RE.match(text):
            self.summary = (int(match.group(1)), int(match.group(2)))
        elif text.startswith("PS_CLUSTER_UP"):
            self.up.set()
        elif match := _JOINED_RE.match(text):
            role, rank, host = match.groups()
            with self._lock:
                self.joined.append((role, int(rank) if rank.isdigit() else None, host))
        elif match := _DEAD_RE.match(text):
            role, rank, host, pid, reason = match.groups()
            with self._lock:
                self._deaths.append(Death(role, int(rank), host, int(pid), reason.strip()))

    def take_deaths(self) -> list[Death]:
        """The deaths declared since the last call."""
        with self._lock:
            deaths, self._deaths = self._deaths, []
        return deaths

    def registered(self, spec: ProcessSpec) -> bool:
        with self._lock:
            return any(role == spec.role and rank in (spec.rank, None) for role, rank, _ in self.joined)


@dataclass
class Outcome:
    exit_code: int
    headline: str
    root: Optional[JobProcess] = None
    details: list[str] = field(default_factory=list)


class Job:
    def __init__(self, cfg: LaunchConfig, console: Console):
        self.cfg = cfg
        self.console = console
        self.addresses = host_addresses(cfg)
        self.procs: list[JobProcess] = []
        self.scheduler = SchedulerWatch()
        self.stopper = Stopper(cfg.stop_grace)
        self._signal: Optional[int] = None
        self._lost: list[JobProcess] = []  # failed, but the job went on (elastic, or restarted)
        self._restarts: dict[int, int] = {}
        self._log_dir = Path(cfg.log_dir) if cfg.log_dir else None
        self._deadline = 0.0
        self._started = time.monotonic()
        self._announced = False

    def request_stop(self, signum: int) -> None:
        """From a signal handler: the watch loop notices within one tick."""
        if self._signal is None:
            self._signal = signum

    def run(self) -> int:
        self._deadline = time.monotonic() + self.cfg.start_timeout
        if self._log_dir is not None:
            try:
                self._log_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"cannot create --log-dir {self._log_dir}: {exc.strerror or exc}") from None
        outcome = None
        secrets = SecretFiles(self.cfg)
        self.cfg = dataclasses.replace(self.cfg, secret_file=secrets.write())
        try:
            outcome = self._start_and_watch()
            self.console.message(outcome.headline)
        finally:
            self.stopper.stop_all(self.procs)
            for proc in self.procs:
                proc.close()
            self._merge_trace()
            for problem in secrets.remove():
                self.console.message(problem)
        self._report(outcome)
        return outcome.exit_code

    def _merge_trace(self) -> None:
        if self.cfg.trace_dir and Path(self.cfg.trace_dir).is_dir():
            path, processes = merge(self.cfg.trace_dir)
            self.console.message(f"trace of {processes} processes: {path} (open it in https://ui.perfetto.dev)")

    # -- starting ------------------------------------------------------------------------

    def _start_and_watch(self) -> Outcome:
        scheduler = self._launch(scheduler_process(self.cfg, self.addresses))
        outcome = self._wait_for_address(scheduler)
        if outcome is not None:
            return outcome
        for spec in node_processes(self.cfg, self.addresses, self.scheduler.address):
            proc = self._launch(spec)
            if proc.start_error is not None:
                return self._failed(proc)
        return self._watch()

    def _launch(self, spec: ProcessSpec) -> JobProcess:
        proc = JobProcess(spec, self.console, log_dir=self._log_dir, ssh_config=self.cfg.ssh_config,
                          cwd=self.cfg.cwd, python=self.cfg.python, stop_grace=self.cfg.stop_grace,
                          on_line=self.scheduler.on_line if spec.role == "scheduler" else None,
                          quiet=spec.role != "worker" and not self.cfg.verbose,
                          slurm_job=self.cfg.slurm.job_id if self.cfg.slurm else None,
                          secret=self._secret_for(spec))
        self.procs.append(proc)
        proc.start()
        return proc

    def _secret_for(self, spec: ProcessSpec) -> Optional[bytes]:
        """Under Slurm, a remote process's agent gets the job secret on its stdin (see remote_child)."""
        if spec.local or spec.launcher != "slurm" or not self.cfg.secret_file:
            return None
        return Path(self.cfg.secret_file).read_bytes()

    def _wait_for_address(self, scheduler: JobProcess) -> Optional[Outcome]:
        while self.scheduler.address is None:
            if self._signal is not None:
                return self._interrupted()
            if scheduler.exit_code() is not None:
                return self._failed(scheduler)
            if time.monotonic() >= self._deadline:
                return self._timed_out()
            time.sleep(TICK)
        return None

    # -- watching ------------------------------------------------------------------------

    def _watch(self) -> Outcome:
        drain_until: Optional[float] = None
        while True:
            if self._signal is not None:
                return self._interrupted()
            self._tend()
            self._announce_up()
            # a process declared dead is the cause of what follows: wait (within its grace) until it is gone
            failed = None if self._ending_dead() else self._first_failure()
            if failed is not None and not self._survive(failed):
                return self._failed(failed)
            workers = [p for p in self.procs if p.spec.role == "worker" and p not in self._lost]
            now = time.monotonic()
            if not workers:
                return Outcome(EXIT_FAILED, "job failed: every worker was lost")
            if all(w.exit_code() == 0 for w in workers):
                if not any(p.running() for p in self.procs) or not self.scheduler.up.is_set():
                    return self._succeeded()
                drain_until = drain_until or now + DRAIN_TIMEOUT
                if now >= drain_until:
                    self.console.message(f"the scheduler or servers did not stop within {DRAIN_TIMEOUT:g} s "
                                         "after the workers finished; stopping them")
                    return self._succeeded()
            elif not self.scheduler.up.is_set() and now >= self._deadline:
                return self._timed_out()
            time.sleep(TICK)

    def _announce_up(self) -> None:
        """One line once every process of the job has joined."""
        if self._announced or not self.scheduler.up.is_set():
            return
        self._announced = True
        cfg, layout = self.cfg, self.cfg.layout
        device = cfg.server_device or "cuda where available, else cpu"
        metrics = f"; metrics {self.scheduler.metrics_address}" if self.scheduler.metrics_address else ""
        where = f"; logs: {self._log_dir}/" if self._log_dir is not None else ""
        self.console.message(f"job up in {time.monotonic() - self._started:.1f} s: {len(layout.workers)} workers, "
                             f"{len(layout.servers)} servers (shards on {device}), {cfg.mode}; scheduler "
                             f"{self.scheduler.address}{metrics}{where}")

    def _first_failure(self) -> Optional[JobProcess]:
        failed = self._failures()
        if not failed or not _is_secondary(failed[0]):
            return failed[0] if failed else None
        # A worker that fails says goodbye before its process has finished exiting, so the others
        # can die of PeerLostError first; give the real culprit a moment to show up.
        settle_until = time.monotonic() + SETTLE
        while time.monotonic() < settle_until or self._ending_dead():
            self._tend()
            primary = [p for p in self._failures() if not _is_secondary(p)]
            if primary:
                return primary[0]
            time.sleep(TICK)
        return failed[0]

    def _failures(self) -> list[JobProcess]:
        # declared dead first, then workers: a scheduler or server failing in the same tick is most
        # likely the consequence
        failed = [p for p in reversed(self.procs) if p not in self._lost and p.exit_code() is not None
                  and (p.exit_code() != 0 or p.dead_reason is not None)]
        return sorted(failed, key=lambda p: p.dead_reason is None)

    def _tend(self) -> None:
        """Every tick: end the processes the scheduler declared dead; SIGKILL what outlived its grace."""
        scheduler = self.procs[0]
        if not scheduler.running():
            scheduler.join_output(timeout=0.5)  # its last lines may declare deaths
        for death in self.scheduler.take_deaths():
            proc = declared_process(self.procs, death)
            if proc is None:
                self.console.message(f"the scheduler declared {death.role} {death.rank} on host {death.host} "
                                     f"(pid {death.pid}) dead ({death.reason}); no process that ps-launch "
                                     "still runs is that one: nothing to end")
                continue
            proc.declare_dead(death.reason)
            self.console.message(f"{proc.where()} {proc.death()}; ending it")
            self.stopper.begin(proc)
        self.stopper.escalate()

    def _ending_dead(self) -> bool:
        return any(p.dead_reason is not None and self.stopper.ending(p) for p in self.procs)

    def _survive(self, failed: JobProcess) -> bool:
        """Whether the job goes on after this failure: an elastic job loses a worker, and with
        --restart-failed-servers a server is started again (it reloads the newest checkpoint)."""
        role, rank = failed.spec.role, failed.spec.rank
        if role == "worker" and self.cfg.elastic:
            self._lost.append(failed)
            self.console.message(f"{failed.where()} {failed.describe_exit()}; --elastic: the job goes on "
                                 "without it")
            return True
        if role == "server" and self.cfg.restart_failed_servers and self._restarts.get(rank, 0) < self.cfg.max_restarts:
            self._restarts[rank] = self._restarts.get(rank, 0) + 1
            self._lost.append(failed)
            self.console.message(f"{failed.where()} {failed.describe_exit()}; restarting it "
                                 f"(restart {self._restarts[rank]} of {self.cfg.max_restarts})")
            replacement = self._launch(failed.spec)
            return replacement.start_error is None
        return False

    # -- outcomes ------------------------------------------------------------------------

    def _succeeded(self) -> Outcome:
        workers = sum(1 for p in self.procs if p.spec.role == "worker" and p not in self._lost)
        who = "the worker" if workers == 1 else f"all {workers} workers"
        lost = [f"{p.name} ({p.death()})" if p.dead_reason else p.name
                for p in self._lost if p.spec.role == "worker"]
        restarted = sorted({p.name for p in self._lost if p.spec.role == "server"})
        notes = "".join([f"; lost on the way (--elastic): {', '.join(lost)}" if lost else "",
                         f"; restarted: {', '.join(restarted)}" if restarted else ""])
        still, elapsed = "still in the job " if lost else "", time.monotonic() - self._started
        return Outcome(0, f"job finished in {elapsed:.1f} s: {who} {still}exited 0{notes}{self._totals()}")

    def _totals(self) -> str:
        """Steps and bytes (as the scheduler summed them up), and every role's exit statuses."""
        totals = ""
        if self.scheduler.summary is not None:
            steps, moved = self.scheduler.summary
            totals = f"; {steps} steps, {moved / 1e6:.1f} MB through the servers"
        statuses = {}
        for proc in self.procs:
            code = proc.exit_code()
            statuses.setdefault(proc.spec.role, []).append("running" if code is None else str(code))
        return totals + "; exit status: " + ", ".join(f"{role}s {' '.join(codes)}" if role != "scheduler"
                                                       else f"scheduler {codes[0]}" for role, codes in statuses.items())

    def _failed(self, root: JobProcess) -> Outcome:
        return Outcome(EXIT_FAILED, f"job failed: {root.where()} {root.describe_exit()}; stopping the job",
                       root=root)

    def _interrupted(self) -> Outcome:
        name = signal.Signals(self._signal).name
        return Outcome(128 + self._signal, f"got {name}; stopping the job")

    def _timed_out(self) -> Outcome:
        headline = (f"the cluster did not come up within {self.cfg.start_timeout:g} s (--start-timeout); "
                    "stopping the job")
        started = {(p.spec.role, p.spec.rank): p for p in self.procs}
        missing, joined = [], []
        for placement in (*self.cfg.layout.servers, *self.cfg.layout.workers):
            proc = started.get((placement.role, placement.rank))
            name = f"{placement.role} {placement.rank} on {placement.host}"
            if proc is None:
                missing.append(f"{name} (not started: the scheduler had not reported its address)")
            elif self.scheduler.registered(proc.spec):
                joined.append(name)
            else:
                missing.append(f"{name} ({proc.describe_exit()})")
        details = ["never registered with the scheduler: " + ", ".join(missing)]
        if joined:
            details.append("registered: " + ", ".join(joined))
        if self.scheduler.address is None:
            scheduler = self.procs[0]
            details.append(f"the scheduler on {scheduler.spec.host} never reported its address "
                           f"({scheduler.describe_exit()}); its last lines:")
            details += [f"    | {line}" for line in scheduler.last_lines(SHOWN_LINES)]
        return Outcome(EXIT_FAILED, headline, details=details)

    # -- reporting -----------------------------------------------------------------------

    def _report(self, outcome: Outcome) -> None:
        lines = []
        if outcome.root is not None:
            root = outcome.root
            lines.append(f"ROOT CAUSE: {root.where()}: {root.describe_exit()}")
            tail = root.last_lines(SHOWN_LINES)
            lines.append(f"last {_lines(len(tail))} of {root.name}:" if tail else f"{root.name} printed nothing")
            lines += [f"    | {line}" for line in tail]
        lines += outcome.details
        if outcome.root is not None:
            lines += self._others(outcome.root)
        elif outcome.exit_code != 0:
            stopped = [p.name for p in self.procs if p.stopped_by_launcher]
            lines.append(f"stopped {len(stopped)} processes: {', '.join(stopped)}" if stopped else "")
        killed = [p.where() for p in self.procs if p.had_to_be_killed]
        if killed:
            lines.append(f"did not stop on SIGTERM, killed after the {self.cfg.stop_grace:g} s grace: "
                         + ", ".join(killed))
        if self._log_dir is not None:
            lines.append(f"logs: {self._log_dir}/")
        lines = [line for line in lines if line]
        if lines:
            self.console.message("\n".join(lines))

    def _others(self, root: JobProcess) -> list[str]:
        notes = []
        for proc in self.procs:
            if proc is root:
                continue
            if proc.stopped_by_launcher:
                notes.append(f"  {proc.name} on {proc.spec.host}: stopped by ps-launch")
            else:
                late = " (after the root cause)" if proc.exit_code() != 0 else ""
                notes.append(f"  {proc.name} on {proc.spec.host}: {proc.describe_exit()}{late}")
        return ["other processes:", *notes] if notes else []


def _lines(n: int) -> str:
    return "line" if n == 1 else f"{n} lines"


def declared_process(procs: list[JobProcess], death: Death) -> Optional[JobProcess]:
    """The running process that the scheduler declared dead: the one it names by pid; failing that
    (a command wrapped in a shell on another host), the only running one of that role and rank;
    None for a pid of one of ours that has already ended (a server that its restart replaced)."""
    same = [p for p in procs if (p.spec.role, p.spec.rank) == (death.role, death.rank)]
    named = [p for p in same if p.owns_pid(death.pid)]
    if named:
        return named[-1] if named[-1].running() else None
    running = [p for p in same if p.running()]
    return running[0] if len(running) == 1 else None


def _is_secondary(proc: JobProcess) -> bool:
    """Did it fail because another process of the job was lost (not a root cause)?"""
    if proc.dead_reason is not None:
        return False  # the scheduler itself says this one is the cause
    proc.join_output(timeout=0.5)
    return any(SECONDARY_ERROR in line for line in proc.last_lines(SHOWN_LINES))


@contextlib.contextmanager
def _stop_signals(handler: Callable[[int], None]) -> Iterator[None]:
    """While the job runs, SIGINT/SIGTERM/SIGHUP only ask it to stop; the loop does the stopping."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda signum, frame: handler(signum)) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


__all__ = ["Death", "Job", "Outcome", "SchedulerWatch", "declared_process", "run_job"]
