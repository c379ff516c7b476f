"""``ps-launch``: the click layer. Options (or ``PS_*`` variables) -> ``LaunchConfig`` -> ``run_job``.

    ps-launch -n 2 -s 2 --mode sync -- python train.py --epochs 3
    ps-launch -H hosts.txt -x NCCL_DEBUG=INFO --log-dir logs/ -- python train.py

Exit codes: 0 the job succeeded; 1 it failed or did not come up in time; 2 bad usage;
128+N stopped by signal N (130 for Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Optional

import click

from . import k8s_cli as k8s
from .commands import ProcessSpec, node_processes, resolve, scheduler_process
from .config import DEFAULT_STOP_GRACE, LaunchConfig, parse_exports
from .from_slurm import exec_process, scheduler_endpoint, task_from_env, task_role
from .hostfile import read_hostfile
from .job import run_job
from .slurm import LAUNCHERS, allocation_from_env, node_addresses
from ..config import MODES, host_environment, process_environment, remote_forwarded, tuning_from_env
from ..errors import ConfigError
from ..security import MECHANISMS

_CONTEXT = {"help_option_names": ["-h", "--help"], "allow_interspersed_args": False}


def _option(*decls: str, **kwargs):
    return click.option(*decls, show_envvar=True, **kwargs)


@click.command(context_settings=_CONTEXT)
@_option("-H", "--hostfile", envvar="PS_HOSTFILE", type=click.Path(dir_okay=False),
              help="Hosts to use; without it everything runs on this host.")
@_option("-n", "--num-workers", envvar="PS_NUM_WORKERS", type=int,
              help="Default: the hostfile's total slots, or 1 without a hostfile.")
@_option("-s", "--num-servers", envvar="PS_NUM_SERVERS", type=int,
              help="Default: the hostfile's total servers=, or 1.")
@_option("--mode", envvar="PS_MODE", type=click.Choice(MODES), default="sync", show_default=True)
@_option("--staleness", envvar="PS_STALENESS", type=int, default=2, show_default=True,
              help="For ssp: how many steps the fastest worker may run ahead.")
@_option("--server-device", envvar="PS_SERVER_DEVICE",
              help="cpu, cuda, cuda:N; default cuda where available, else cpu.")
@_option("--scheduler", "scheduler", envvar="PS_SCHEDULER_HOST", metavar="HOST[:PORT]",
              help="Where the scheduler runs; default: the first host, a free port.")
@_option("--bind", envvar="PS_BIND", metavar="ADDRESS",
              help="Address to bind and advertise on this host (multi-NIC hosts).")
@_option("-x", "--env", "exports", envvar="PS_ENV", multiple=True, metavar="NAME[=VALUE]",
              help="Export a variable to every process (like mpirun -x); repeatable.")
@_option("--log-dir", envvar="PS_LOG_DIR", type=click.Path(file_okay=False),
              help="Write one log file per process here (worker-1.log, ...).")
@_option("-v", "--verbose", envvar="PS_VERBOSE", is_flag=True,
         help="Also show the scheduler's and servers' INFO lines (always in --log-dir's files).")
@_option("--trace", "trace_dir", envvar="PS_TRACE_DIR", type=click.Path(file_okay=False), metavar="DIR",
         help="Every process records Chrome trace events under DIR; at the end ps-launch merges them into "
              "DIR/trace.json (open it in Perfetto).")
@_option("--trace-steps", envvar="PS_TRACE_STEPS", metavar="A:B", help="Trace only the workers' steps A to B-1.")
@_option("--metrics-port", envvar="PS_METRICS_PORT", type=click.IntRange(0, 65535), metavar="PORT",
         help="The scheduler serves the job's Prometheus metrics at http://HOST:PORT/metrics (0: a free port, "
              "printed when the job is up). Needs prometheus-client (psframework[metrics]).")
@_option("--start-timeout", envvar="PS_START_TIMEOUT", type=float, default=60.0, show_default=True,
              metavar="SECONDS", help="Deadline for the whole cluster to come up.")
@_option("--ssh-config", envvar="PS_SSH_CONFIG", type=click.Path(exists=True, dir_okay=False),
              help="ssh client config file (ssh -F FILE) for remote hosts.")
@_option("--job-id", envvar="PS_JOB_ID", help="Exported as PS_JOB_ID to every process; default: random.")
@_option("--auth", envvar="PS_AUTH", type=click.Choice(MECHANISMS), default="token", show_default=True,
         help="token: every connection authenticated with a per-job secret; curve: also encrypted "
              "(slower); none: no authentication.")
@_option("--secret-file", "job_secret_file", envvar="PS_JOB_SECRET_FILE", type=click.Path(dir_okay=False),
         help="The job secret: read from FILE, or written there (mode 600) if it does not exist, instead of a "
              "fresh one that is removed at the end; readers and ps-serve outside the job join with it.")
@_option("--checkpoint-dir", envvar="PS_CHECKPOINT_DIR", type=click.Path(file_okay=False),
         help="Where checkpoints are written and read (shared by scheduler and servers).")
@_option("--checkpoint-every", envvar="PS_CHECKPOINT_EVERY", type=int, default=0, show_default=True,
         metavar="N", help="DistributedOptimizer saves a checkpoint every N steps.")
@_option("--resume", envvar="PS_RESUME", is_flag=True, help="Resume from the newest complete checkpoint.")
@_option("--restart-failed-servers", envvar="PS_RESTART_FAILED_SERVERS", is_flag=True,
         help="Restart a server that dies; it reloads its shards from the newest checkpoint.")
@_option("--elastic", envvar="PS_ELASTIC", is_flag=True,
         help="A worker that dies does not stop the job; sync steps average over the live workers.")
@_option("--stop-grace", envvar="PS_STOP_GRACE", type=float, default=DEFAULT_STOP_GRACE, show_default=True,
         metavar="SECONDS", help="When ps-launch ends a process (job over, failed, declared dead, Ctrl-C): "
                                 "seconds from SIGTERM (with SIGCONT) to SIGKILL.")
@_option("--worker-threads", envvar=["PS_WORKER_THREADS", "OMP_NUM_THREADS"], type=click.IntRange(1), metavar="N",
         help="OMP_NUM_THREADS of every worker (default: this host's cores shared among the job's servers and "
              "workers here; 1 on another host that runs several of them).")
@_option("--launcher", envvar="PS_LAUNCHER", type=click.Choice(LAUNCHERS),
         help="How processes of other hosts start: ssh, or slurm (srun steps, hosts from the allocation); "
              "default: slurm inside an allocation without --hostfile, else ssh.")
@_option("--servers-per-node", envvar="PS_SERVERS_PER_NODE", type=int, metavar="N",
         help="N servers on every host (every Slurm node, every hostfile line; N in all without either).")
@_option("--from-slurm", envvar="PS_FROM_SLURM", is_flag=True,
         help="Run as one task of srun -n 1+S+W: task 0 the scheduler, the next S the servers, the rest "
              "the workers (needs --auth none).")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def main(ctx: click.Context, command: tuple[str, ...], hostfile: Optional[str], exports: tuple[str, ...],
         start_timeout: float, from_slurm: bool, **options) -> None:
    """Run COMMAND as the workers of a parameter-server job, with its scheduler and servers.

    Every option can also be set by its PS_* variable (launch/README_ENV.md lists them all).
    `ps-launch k8s --name NAME --image IMAGE -- COMMAND` writes the job's Kubernetes manifests instead.
    `ps-launch top HOST:PORT` watches a running job through its --metrics-port instead.
    """
    if command[:1] == ("top",):
        from ..top import main as top

        top.main(args=list(command[1:]), prog_name="ps-launch top")
    if command[:1] == ("k8s",):
        k8s.main(args=list(command[1:]), prog_name="ps-launch k8s")
    try:
        if from_slurm:
            spec = slurm_task_process(command, exports, start_timeout, process_environment(), **options)
            exec_process(spec.argv, {**host_environment(), **spec.environ})
        cfg = build_config(command, hostfile, exports, start_timeout, **options)
        code = run_job(cfg)
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx) from None
    ctx.exit(code)


def build_config(command: tuple[str, ...], hostfile: Optional[str], exports: tuple[str, ...],
                 start_timeout: float, job_id: Optional[str] = None, launcher: Optional[str] = None,
                 environ: Optional[dict[str, str]] = None, **options) -> LaunchConfig:
    """The ``LaunchConfig`` for these option values; reads the hostfile, the Slurm allocation
    (``environ``, default this process's, and ``scontrol``) and, through ``psframework.config``,
    the settings of this environment that have no option."""
    # PS_CHUNK_BYTES, PS_HEARTBEAT_*, PS_MAX_MESSAGE_BYTES and PS_LOG_LEVEL have no option; they pass through
    tuning = tuning_from_env()
    extra = {"job_id": job_id} if job_id else {}
    allocation = allocation_from_env(process_environment() if environ is None else environ)
    launcher = launcher or ("slurm" if allocation is not None and not hostfile else "ssh")
    hosts = read_hostfile(hostfile) if hostfile else None
    addresses: tuple[tuple[str, str], ...] = ()
    if launcher == "slurm" and allocation is not None:
        hosts = hosts if hosts is not None else allocation.host_entries()
        addresses = tuple(node_addresses([h.host for h in hosts]).items())
    return LaunchConfig(
        command=tuple(command),
        hosts=hosts,
        hostfile=hostfile,
        launcher=launcher,
        slurm=allocation,
        node_addresses=addresses,
        env=parse_exports(exports),
        forward_env=remote_forwarded(),
        timing=dataclasses.replace(tuning.timing, start_timeout=start_timeout),
        chunk_bytes=tuning.chunk_bytes,
        max_message_bytes=tuning.max_message_bytes,
        log_level=tuning.log_level,
        peer_buffer_bytes=tuning.peer_buffer_bytes,
        python=sys.executable,
        cwd=os.getcwd(),
        **extra,
        **options,
    )


def slurm_task_process(command: tuple[str, ...], exports: tuple[str, ...], start_timeout: float,
                       environ: dict[str, str], num_workers: Optional[int] = None, num_servers: Optional[int] = None,
                       scheduler: Optional[str] = None, bind: Optional[str] = None, job_id: Optional[str] = None,
                       launcher: Optional[str] = None, **options) -> ProcessSpec:
    """What this task of ``srun -n 1+S+W ... --from-slurm`` runs: its role by SLURM_PROCID."""
    task = task_from_env(environ)
    servers = num_servers or 1
    role, rank = task_role(task.procid, task.ntasks, servers)
    workers = task.ntasks - 1 - servers
    if num_workers is not None and num_workers != workers:
        raise ConfigError(f"--from-slurm: srun gave {task.ntasks} tasks, so {workers} workers, not -n {num_workers}")
    if options.get("auth") != "none":
        raise ConfigError("--from-slurm has no launcher to hand the job secret to every task: pass --auth none "
                          "(only on a network you trust), or let ps-launch start the job inside the allocation")
    addrs = node_addresses(sorted({task.first_node, task.node}))
    first, own = (resolve(addrs.get(node, node)) for node in (task.first_node, task.node))
    own = bind or own
    endpoint = scheduler_endpoint(task, scheduler, first)
    cfg = build_config(command, None, exports, start_timeout, job_id=job_id or f"slurm-{task.job_id}",
                       launcher="ssh", environ={}, num_workers=workers, num_servers=servers, scheduler=endpoint,
                       bind=own, **options)
    addresses = {cfg.layout.scheduler.host: own if role == "scheduler" else first, own: own}
    if role == "scheduler":
        return scheduler_process(cfg, addresses)
    return next(spec for spec in node_processes(cfg, addresses, f"tcp://{endpoint}")
                if (spec.role, spec.rank) == (role, rank))


if __name__ == "__main__":
    main(prog_name="ps-launch")
