"""A real Slurm of two nodes on this machine, for the tests: munge, slurmctld and two slurmd.

Debian's Slurm is built with MULTIPLE_SLURMD, so ``slurmd -N n1`` and ``slurmd -N n2`` on their
own ports make two nodes of one machine, and a job really spans two nodes (both NodeAddr
127.0.0.1; the names n1, n2 do not resolve: the launcher must take Slurm's NodeAddr).
``config_overrides`` lets the nodes declare more CPUs than a 2-core machine has; ``task/none``
and ``proctrack/linuxproc`` avoid cgroups. Everything lives in a temporary directory on free
ports, and ``slurm_cluster`` stops every daemon it started, also when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional
from tests.ports import free_ports

MUNGE_DIR = Path("/run/munge")
MUNGE_PID = MUNGE_DIR / "munged.pid"
NODES = ("n1", "n2")
CPUS_PER_NODE = 4
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
DAEMONS = ("slurmctld", "slurmd", "scontrol", "sbatch", "srun", "munged")


@dataclass
class SlurmCluster:
    directory: Path
    env: dict[str, str]  # os.environ plus SLURM_CONF

    def run(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("timeout", 60)
        kwargs.setdefault("env", self.env)
        return subprocess.run(argv, capture_output=True, text=True, **kwargs)


def unavailable_reason() -> Optional[str]:
    """None if a Slurm can be started here, else why not (for pytest.skip)."""
    if os.geteuid() != 0:
        return "the Slurm tests start munge and slurmd, which needs root"
    missing = [name for name in DAEMONS if _exe(name) is None]
    if missing:
        return (f"Slurm is not installed ({', '.join(missing)} missing); as root, make sysdeps installs "
                "slurmctld slurmd slurm-client munge")
    return None


@contextlib.contextmanager
def slurm_cluster(directory: Path) -> Iterator[SlurmCluster]:
    started: list[int] = []
    munged = None
    try:
        munged = _start_munge()
        conf = _write_config(directory)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        cluster = SlurmCluster(directory, env)
        subprocess.run([_exe("slurmctld")], env=env, check=True, timeout=30)
        started.append(_read_pid(directory / "ctld.pid"))
        for node in NODES:
            subprocess.run([_exe("slurmd"), "-N", node], env=env, check=True, timeout=30)
            started.append(_read_pid(directory / f"d-{node}.pid"))
        _wait_idle(cluster)
        yield cluster
    finally:
        _stop([pid for pid in started if pid])
        if munged is not None:
            _stop([munged])


def _exe(name: str) -> Optional[str]:
    """The daemons are in /usr/sbin, which a non-login PATH may lack."""
    found = shutil.which(name) or str(Path("/usr/sbin", name))
    return found if os.access(found, os.X_OK) else None


def _start_munge() -> Optional[int]:
    """Start munged unless one runs; returns its pid if we started it (else None: not ours to stop)."""
    if _alive(_read_pid(MUNGE_PID)):
        return None
    subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", str(MUNGE_DIR)], check=True)
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([_exe("mungekey") or "mungekey", "-c", "-f"], check=True, capture_output=True)
    subprocess.run(["runuser", "-u", "munge", "--", _exe("munged")], check=True, timeout=30)
    return _read_pid(MUNGE_PID)


def _write_config(d: Path) -> Path:
    for sub in ("state", "spool/n1", "spool/n2"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    host = socket.gethostname().split(".")[0]
    ctld, *node_ports = free_ports(1 + len(NODES))
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} "
                      "RealMemory=1024" for n, p in zip(NODES, node_ports))
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=pstest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/ctld.pid
SlurmdPidFile={d}/d-%n.pid
SlurmctldLogFile={d}/ctld.log
SlurmdLogFile={d}/d-%n.log
{nodes}
PartitionName=test Nodes=ALL Default=YES MaxTime=10 State=UP
""")
    return conf


def _wait_idle(cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    states = ""
    while time.monotonic() < deadline:
        done = cluster.run(["sinfo", "-h", "-o", "%T"], timeout=10)
        states = " ".join(sorted(set(done.stdout.split())))
        if done.returncode == 0 and states == "idle":
            return
        time.sleep(0.5)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted(cluster.directory.glob("*.log")))
    raise RuntimeError(f"Slurm nodes not idle within {START_TIMEOUT:g} s (sinfo: {states!r}):\n{logs}")


def _read_pid(path: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    return 0


def _alive(pid: int) -> bool:
    """Running, and not a zombie (a daemon whose parent is this test process stays one until we exit)."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _stop(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
