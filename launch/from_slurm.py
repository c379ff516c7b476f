"""``python -m psframework.launch --from-slurm -s S --auth none -- python train.py``, run by every task
of a plain ``srun -n 1+S+W``: each task becomes one process of the job, by its ``SLURM_PROCID``.

Task 0 is the scheduler, tasks 1..S the servers, the rest the workers. The scheduler listens on
the first node of the step at a port derived from the job id (``--scheduler HOST:PORT`` to choose
another), so every task knows the address without asking anyone. Each task execs its process in
place: srun itself watches them (``--kill-on-bad-exit=1`` ends the step when one fails).

Example::

    >>> task_role(procid=0, ntasks=4, num_servers=1)
    ('scheduler', 0)
    >>> [task_role(p, 4, 1) for p in (1, 2, 3)]
    [('server', 0), ('worker', 0), ('worker', 1)]
    >>> derived_port("1234")
    21234
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

from .hostlist import expand_hostlist
from .hosts import join_host_port, split_host_port
from ..errors import ConfigError

PORT_BASE = 20000
PORT_SPAN = 20000


@dataclass(frozen=True)
class SlurmTask:
    """This task of the step: its place in the step, its node, and the step's first node."""

    job_id: str
    procid: int
    ntasks: int
    node: str
    first_node: str


def task_from_env(environ: Mapping[str, str]) -> SlurmTask:
    """This srun task, from the variables srun sets; ConfigError outside a step."""
    names = ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURMD_NODENAME")
    missing = [name for name in names if not environ.get(name)]
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if missing or not nodelist:
        raise ConfigError(f"--from-slurm runs as a task of srun, but {', '.join(missing) or 'SLURM_STEP_NODELIST'} "
                          "is not set: start it as srun -n 1+S+W python -m psframework.launch --from-slurm ...")
    return SlurmTask(job_id=environ["SLURM_JOB_ID"], procid=int(environ["SLURM_PROCID"]),
                     ntasks=int(environ["SLURM_NTASKS"]), node=environ["SLURMD_NODENAME"],
                     first_node=expand_hostlist(nodelist)[0])


def task_role(procid: int, ntasks: int, num_servers: int) -> tuple[str, int]:
    """(role, rank) of task ``procid`` of ``ntasks``: 0 the scheduler, then the servers, then the workers."""
    if ntasks < num_servers + 2:
        raise ConfigError(f"srun gave {ntasks} tasks; a job of {num_servers} servers needs at least "
                          f"{num_servers + 2} (1 scheduler, {num_servers} servers, 1 worker): srun -n {num_servers + 2} or more")
    if procid == 0:
        return "scheduler", 0
    if procid <= num_servers:
        return "server", procid - 1
    return "worker", procid - 1 - num_servers


def derived_port(job_id: str) -> int:
    """The scheduler's port: the same in every task of the job, different for most concurrent jobs."""
    digits = "".join(c for c in job_id if c.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def scheduler_endpoint(task: SlurmTask, scheduler: Optional[str], first_address: str) -> str:
    """``HOST:PORT`` of the scheduler: ``--scheduler`` where given (its port, or the derived one), else
    the first node's address and the derived port."""
    host, port = split_host_port(scheduler) if scheduler else (first_address, None)
    return join_host_port(host, port or derived_port(task.job_id))


def exec_process(argv: tuple[str, ...], env: Mapping[str, str]) -> None:
    """Become the process: srun watches and signals it directly."""
    os.execvpe(argv[0], list(argv), dict(env))


__all__ = ["SlurmTask", "derived_port", "exec_process", "scheduler_endpoint", "task_from_env", "task_role"]
