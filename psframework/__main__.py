"""``python -m psframework scheduler|server``: the entry points that ps-launch starts."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys
from typing import Optional

import click

from .config import MODES, log_level_from_env, node_config_from_env, scheduler_config_from_env
from .errors import PSError


def _setup_logging(role: str) -> None:
    logging.basicConfig(level=log_level_from_env(), stream=sys.stderr,
                        format=f"%(asctime)s {role} %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _interrupt)


def _tune_server_process() -> None:
    """Process-wide settings for a server, measured by benchmarks/pushpull.py on 2 cores.

    Few torch threads: the update of one block is a few milliseconds of memory-bound work. On 2
    cores extra OpenMP threads only spin against the ZeroMQ I/O thread that receives the next
    block, so one; a host with cores to spare gets up to 4, a quarter of them, since one thread
    alone cannot stream the update at the speed the next block arrives.
    Keep freed memory: ZeroMQ allocates every received message with malloc, and glibc otherwise
    returns each multi-MiB buffer to the kernel, so the next message faults in every page again.
    """
    import torch

    torch.set_num_threads(max(1, min(4, (os.cpu_count() or 1) // 4)))
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the largest glibc accepts
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>
_M_MMAP_THRESHOLD = -3


def _interrupt(signum, frame) -> None:
    # SIGTERM from a launcher should run our finally blocks and close sockets, as Ctrl-C does
    raise KeyboardInterrupt


@click.group()
def cli() -> None:
    """psframework node processes (normally started by ps-launch)."""


@cli.command()
@click.option("--num-workers", "-n", type=int, default=None)
@click.option("--num-servers", "-s", type=int, default=None)
@click.option("--mode", type=click.Choice(MODES), default=None)
@click.option("--staleness", type=int, default=None)
@click.option("--bind", "bind_host", default=None, help="address to bind")
@click.option("--port", type=int, default=None, help="port to bind (default: a free one)")
@click.option("--server-device", default=None)
@click.option("--address-file", type=click.Path(dir_okay=False), default=None,
              help="write the bound address here once listening")
def scheduler(address_file: Optional[str], **options) -> None:
    """Run the scheduler."""
    from .scheduler import main

    _setup_logging("scheduler")
    try:
        config = scheduler_config_from_env(**options)
        sys.exit(main(config, address_file))
    except PSError as exc:
        click.echo(f"scheduler: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


@cli.command()
@click.option("--scheduler", "scheduler_address", default=None)
@click.option("--rank", type=int, default=None)
@click.option("--bind", "bind_host", default=None)
@click.option("--device", default=None)
def server(scheduler_address: Optional[str], **options) -> None:
    """Run a server."""
    from .server import Server

    _setup_logging("server")
    _tune_server_process()
    try:
        config = node_config_from_env(scheduler=scheduler_address, **options)
        sys.exit(Server(config).serve())
    except PSError as exc:
        click.echo(f"server: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    cli()
