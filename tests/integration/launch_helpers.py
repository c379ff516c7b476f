"""Helpers for tests that run the real ``ps-launch`` (``python -m psframework.launch``) as a subprocess.

Every job gets a unique ``PS_JOB_ID`` in ps-launch's environment; ps-launch exports it to every
process it starts (and ssh clients inherit it), so ``job_processes(job_id)`` finds anything of the
job still alive by scanning ``/proc/*/environ``: that is how the tests prove nothing outlived it.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "tests" / "integration" / "scripts" / "train_check.py"
# passed through by ps-launch to every process: a finished job shuts down in a fraction of a second
FAST_HEARTBEATS = {"PS_HEARTBEAT_INTERVAL": "0.2", "PS_HEARTBEAT_TIMEOUT": "4"}


def train_check():
    """The training script as a module, for its data, model and step count."""
    spec = importlib.util.spec_from_file_location("train_check", TRAIN_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference_params() -> dict[str, torch.Tensor]:
    """One process, whole batches, mean loss, plain SGD: what the sync job must reproduce."""
    tc = train_check()
    model = tc.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=tc.LR)
    for x, y in tc.make_data():
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    elapsed: float


class Launch:
    """One ps-launch run: its process, its output files, its job id."""

    def __init__(self, args: Sequence[str], tmp_path: Path, env: Optional[dict] = None, tag: str = "job"):
        self.job_id = f"pstest-{uuid.uuid4().hex[:12]}"
        self._out = open(tmp_path / f"{tag}.stdout", "w+")
        self._err = open(tmp_path / f"{tag}.stderr", "w+")
        full_env = {**os.environ, "PYTHONPATH": str(REPO), "PS_JOB_ID": self.job_id, **FAST_HEARTBEATS,
                    **(env or {})}
        self.started = time.monotonic()
        # a session of its own, so the tests' cleanup can kill ps-launch and anything it left
        self.proc = subprocess.Popen([sys.executable, "-m", "psframework.launch", *args], cwd=REPO, env=full_env,
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
                                     start_new_session=True)

    def stdout(self) -> str:
        return _read(self._out)

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.stdout():
            if self.proc.poll() is not None:
                raise AssertionError(f"ps-launch exited ({self.proc.returncode}) before printing {text!r}:\n"
                                     f"{self.stdout()}\n{_read(self._err)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} within {timeout} s:\n{self.stdout()}\n{_read(self._err)}")
            time.sleep(0.05)

    def wait(self, timeout: float = 60) -> Result:
        self.proc.wait(timeout=timeout)
        return Result(self.proc.returncode, self.stdout(), _read(self._err), time.monotonic() - self.started)

    def cleanup(self) -> None:
        """Whatever happened, leave nothing running."""
        if self.proc.poll() is None:
            _killpg(self.proc.pid)
            self.proc.wait(timeout=10)
        for pid, _ in job_processes(self.job_id):
            _kill(pid)
        self._out.close()
        self._err.close()


def _read(f) -> str:
    f.flush()
    f.seek(0)
    return f.read()


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def job_processes(job_id: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries PS_JOB_ID=job_id."""
    marker = f"PS_JOB_ID={job_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":  # zombies are dead, just not reaped yet
            found.append((int(entry.name), cmdline))
    return found


def assert_no_leftovers(job_id: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while (left := job_processes(job_id)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"processes of job {job_id} outlived ps-launch: {left}"


def root_cause_block(stderr: str) -> list[str]:
    """ps-launch's failure report, from its ROOT CAUSE line on."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("ps-launch: ROOT CAUSE:")]
    assert starts, f"no ROOT CAUSE line in ps-launch's stderr:\n{stderr}"
    return lines[starts[0]:]
