"""``ps-serve MODULE:FACTORY --from-job ADDRESS | --from-file FILE [--replicas N]``."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional

import click

from ..config import ROUTINGS, ServeConfig, log_level_from_env
from ..errors import PSError

log = logging.getLogger("psframework.serve")


def _shape(ctx, param, value: Optional[str]) -> Optional[tuple[int, ...]]:
    if value is None:
        return None
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give sizes separated by commas, e.g. 64 or 3,224,224") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("factory", metavar="MODULE:FACTORY")
@click.option("--from-job", metavar="ADDRESS", help="a running job's scheduler, tcp://HOST:PORT: serve its live weights")
@click.option("--from-file", type=click.Path(dir_okay=False), help="a file of python -m psframework.export")
@click.option("--secret-file", type=click.Path(dir_okay=False), envvar="PS_SECRET_FILE", show_envvar=True,
              help="the job's secret (ps-launch --secret-file)")
@click.option("--host", "bind_host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8000, show_default=True, help="0: any free port (printed)")
@click.option("--replicas", default=1, show_default=True, help="model processes behind one front")
@click.option("--routing", type=click.Choice(ROUTINGS), default="least-in-flight", show_default=True)
@click.option("--max-batch", default=64, show_default=True, help="examples per forward pass, at most")
@click.option("--max-delay-ms", default=5.0, show_default=True, help="how long a batch waits for more requests")
@click.option("--max-body-bytes", default=16 << 20, show_default=True)
@click.option("--input-shape", callback=_shape, help="shape of one example, e.g. 64 or 3,224,224 (default: the "
                                                     "model's input_shape attribute)")
@click.option("--input-dtype", default="float32", show_default=True)
@click.option("--device", default="cpu", show_default=True, help="where the model runs: cpu, cuda, cuda:N")
@click.option("--refresh-every", default=1.0, show_default=True, help="seconds between looks at the job's version")
@click.option("--timeout", default=30.0, show_default=True, help="seconds for the job's welcome and each read")
def main(**options) -> None:
    """Serve the torch.nn.Module that MODULE:FACTORY() builds, with the weights of a live job or of
    an exported file: POST /predict, GET /healthz, GET /metrics."""
    logging.basicConfig(level=log_level_from_env(), format="%(asctime)s ps-serve %(levelname)s %(message)s")
    sys.path.insert(0, os.getcwd())
    try:
        config = ServeConfig(factory=options.pop("factory"), **options)
        serve(config)
    except PSError as exc:
        raise click.ClickException(str(exc)) from None


def serve(config: ServeConfig) -> None:
    from . import http

    if config.replicas == 1:
        from .replica import Replica
        app, what = Replica(config).app, "one replica"
    else:
        from .front import Front
        app, what = Front(config).app, f"{config.replicas} replicas, {config.routing}"
    sock = http.bind(config.bind_host, config.port)
    http.run(app, sock, lambda port: click.echo(f"PS_SERVE_ADDRESS=http://{config.bind_host}:{port} "
                                                f"({config.factory}, {what})", nl=True))


@click.command()
@click.option("--replica", "config_json", required=True)
@click.option("--index", type=int, required=True)
@click.option("--port-file", type=click.Path(dir_okay=False), required=True)
def replica_main(config_json: str, index: int, port_file: str) -> None:
    """One replica of a front (``front.py``): serves on a free port, which it writes to PORT_FILE."""
    from . import http
    from .replica import Replica

    logging.basicConfig(level=log_level_from_env(), format=f"%(asctime)s ps-serve replica {index} %(levelname)s "
                                                           "%(message)s")
    fields = json.loads(config_json)
    fields["input_shape"] = tuple(fields["input_shape"]) if fields.get("input_shape") else None
    try:
        replica = Replica(ServeConfig(**fields))
    except PSError as exc:
        raise click.ClickException(f"replica {index}: {exc}") from None
    sock = http.bind("127.0.0.1", 0)

    def announce(port: int) -> None:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)

    http.run(replica.app, sock, announce)


__all__ = ["main", "replica_main", "serve"]

if __name__ == "__main__":  # pragma: no cover
    main()
