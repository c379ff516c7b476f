"""``ps-launch k8s``: write the Kubernetes manifests of a job, for ``kubectl apply -f``.

    ps-launch k8s --name digits --image me/train:1 -n 4 -s 2 -o job.yaml -- python train.py
    kubectl apply -f job.yaml            # and kubectl delete -f job.yaml when it is over

The file holds the job secret (a Secret): it is written readable by you only.
"""

from __future__ import annotations

import os
from typing import Optional

import click

from .config import parse_exports
from .k8s import DEFAULT_PORT, K8sJob, manifests, to_yaml
from ..config import MODES
from ..errors import ConfigError
from ..security import MECHANISMS, JobSecret


@click.command(context_settings={"help_option_names": ["-h", "--help"], "allow_interspersed_args": False})
@click.option("--name", required=True, help="The job's name: prefix of every object (lower-case, digits, '-').")
@click.option("--image", required=True, help="Container image with psframework and your training script.")
@click.option("-n", "--num-workers", type=int, default=1, show_default=True)
@click.option("-s", "--num-servers", type=int, default=1, show_default=True)
@click.option("--mode", type=click.Choice(MODES), default="sync", show_default=True)
@click.option("--staleness", type=int, default=2, show_default=True)
@click.option("--server-device", help="cpu, cuda, cuda:N; default cuda where available, else cpu.")
@click.option("--gpus-per-worker", type=int, default=0, show_default=True, help="nvidia.com/gpu limit of each worker.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True,
              help="The scheduler's port.")
@click.option("--python", default="python", show_default=True, help="The image's interpreter, for scheduler and servers.")
@click.option("--auth", type=click.Choice(MECHANISMS), default="token", show_default=True)
@click.option("-x", "--env", "exports", multiple=True, metavar="NAME[=VALUE]", help="Export to every pod; repeatable.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def main(ctx: click.Context, command: tuple[str, ...], exports: tuple[str, ...], output: Optional[str],
         **options) -> None:
    """Write the manifests that run COMMAND as the workers of a job on Kubernetes."""
    try:
        job = K8sJob(command=tuple(command), env=parse_exports(exports), **options)
    except ConfigError as exc:
        raise click.UsageError(str(exc), ctx) from None
    secret = JobSecret.generate(job.auth).to_json() if job.auth != "none" else None
    text = to_yaml(manifests(job, secret))
    if output is None:
        click.echo(text, nl=False)
        return
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


__all__ = ["main"]
