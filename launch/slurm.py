"""ps-launch inside a Slurm allocation: its hosts from Slurm's variables, its remote processes by srun.

Example::

    >>> env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)",
    ...        "SLURMD_NODENAME": "n1"}
    >>> allocation = allocation_from_env(env)
    >>> allocation.nodes, allocation.tasks, allocation.this_node
    (('n1', 'n2'), (2, 2), 'n1')
    >>> [(h.host, h.slots, h.servers) for h in allocation.host_entries(servers_per_node=1)]
    [('n1', 2, 1), ('n2', 2, 1)]
    >>> srun_argv("42", "n2", ["hostname"])
    ['srun', '--overlap', '--jobid', '42', '-w', 'n2', '-N1', '-n1', '--', 'hostname']
    >>> parse_node_addresses("NodeName=n1 Arch=x86_64 NodeAddr=10.0.0.1 NodeHostName=a\\n")
    {'n1': '10.0.0.1'}

Each process of another node is a job step of its own (``srun --overlap -w NODE -N1 -n1``) that
runs ``remote_child``, the agent the ssh launcher uses: srun carries the end of its stdin to the
agent, which then stops its command (and ``scancel`` sends every step SIGTERM, which the agent
takes the same way). Node names need not resolve as host names; processes bind and advertise the
node's ``NodeAddr`` (``scontrol show node``).
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .hostfile import HostEntry
from .hostlist import expand_hostlist, expand_tasks_per_node
from ..errors import ConfigError

LAUNCHERS = ("ssh", "slurm")
SCONTROL_TIMEOUT = 30.0
_NODE_ADDR = re.compile(r"\bNodeName=(\S+).*?\bNodeAddr=(\S+)")


@dataclass(frozen=True)
class SlurmAllocation:
    """The allocation ps-launch runs in: its nodes, the tasks Slurm gave each, and this node."""

    job_id: str
    nodes: tuple[str, ...]
    tasks: tuple[int, ...]
    this_node: Optional[str]

    @property
    def source(self) -> str:
        """How messages name where the hosts came from."""
        return f"Slurm job {self.job_id} (SLURM_JOB_NODELIST)"

    def host_entries(self, servers_per_node: Optional[int] = None) -> tuple[HostEntry, ...]:
        """One host per node: as many worker slots as Slurm gave it tasks, ``servers_per_node`` servers."""
        return tuple(HostEntry(host=node, ssh_port=None, slots=tasks, servers=servers_per_node or 0, line=i + 1)
                     for i, (node, tasks) in enumerate(zip(self.nodes, self.tasks)))


def allocation_from_env(environ: Mapping[str, str]) -> Optional[SlurmAllocation]:
    """The allocation these variables describe; None outside one (no SLURM_JOB_ID or SLURM_JOB_NODELIST)."""
    job_id, nodelist = environ.get("SLURM_JOB_ID"), environ.get("SLURM_JOB_NODELIST")
    if not job_id or not nodelist:
        return None
    nodes = tuple(expand_hostlist(nodelist))
    tasks_text = environ.get("SLURM_TASKS_PER_NODE")
    tasks = tuple(expand_tasks_per_node(tasks_text)) if tasks_text else (1,) * len(nodes)
    if len(tasks) != len(nodes):
        raise ConfigError(f"Slurm job {job_id}: SLURM_TASKS_PER_NODE={tasks_text!r} gives {len(tasks)} counts "
                          f"for the {len(nodes)} nodes of SLURM_JOB_NODELIST={nodelist!r}")
    return SlurmAllocation(job_id=job_id, nodes=nodes, tasks=tasks, this_node=environ.get("SLURMD_NODENAME"))


def srun_argv(job_id: str, node: str, argv: Sequence[str], cwd: Optional[str] = None) -> list[str]:
    """argv that runs ``argv`` as one task of a new step of job ``job_id`` on ``node``; ``--overlap``
    because the batch step (ps-launch itself) already holds the allocation's CPUs."""
    chdir = ["--chdir", cwd] if cwd else []
    return ["srun", "--overlap", "--jobid", job_id, "-w", node, "-N1", "-n1", *chdir, "--", *argv]


def srun_script_argv(job_id: str, node: str, script: str) -> list[str]:
    """argv that runs a shell script on ``node`` (installing or removing files, killing a group)."""
    return srun_argv(job_id, node, ["sh", "-c", script])


def node_addresses(nodes: Sequence[str]) -> dict[str, str]:
    """Each node's ``NodeAddr``, from one ``scontrol show node``; {} where scontrol cannot say
    (the caller then resolves the node's name)."""
    if not nodes:
        return {}
    try:
        done = subprocess.run(["scontrol", "-o", "show", "node", ",".join(nodes)], capture_output=True,
                              text=True, timeout=SCONTROL_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_node_addresses(done.stdout) if done.returncode == 0 else {}


def parse_node_addresses(text: str) -> dict[str, str]:
    """``{node: NodeAddr}`` from ``scontrol -o show node`` output (one node per line)."""
    return {m.group(1): m.group(2) for m in map(_NODE_ADDR.search, text.splitlines()) if m}


__all__ = ["LAUNCHERS", "SlurmAllocation", "allocation_from_env", "node_addresses", "parse_node_addresses",
           "srun_argv", "srun_script_argv"]
