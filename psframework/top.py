"""``ps-launch top ADDRESS`` (or ``python -m psframework.top ADDRESS``): a live terminal view of a
running job, refreshed from its metrics endpoint (``--metrics-port``, ``psframework/metrics.py``).

Per worker its step rate and the share of time it waits for answers; per server its pushes, bytes
and the share of time it applies updates, its queue and the staleness of what it applies. The
slowest worker and the busiest server are highlighted; nodes that died are listed as failures.
Rates are taken between two scrapes, so the first frame shows totals only.
"""

from __future__ import annotations

import importlib.util
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Optional

import click

from .errors import ConfigError

Samples = dict[tuple[str, tuple], float]  # (name, sorted labels) -> value


def parse(text: str) -> Samples:
    """The samples of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(address: str, timeout: float = 5.0) -> Samples:
    with urllib.request.urlopen(address, timeout=timeout) as response:
        return parse(response.read().decode())


@dataclass
class Row:
    """One node's line in the view."""

    role: str
    rank: int
    host: str
    up: bool
    values: dict[str, float] = field(default_factory=dict)
    highlight: str = ""  # "slowest" or "busiest"


def _nodes(samples: Samples) -> dict[tuple[str, int, str], dict[str, float]]:
    """Every node's plain samples (no extra labels), by (role, rank, host)."""
    nodes: dict[tuple[str, int, str], dict[str, float]] = {}
    for (name, labels), number in samples.items():
        labels = dict(labels)
        if set(labels) == {"role", "rank", "host"}:
            nodes.setdefault((labels["role"], int(labels["rank"]), labels["host"]), {})[name] = number
    return nodes


def _rate(now: dict, before: dict, name: str, seconds: float) -> Optional[float]:
    if seconds <= 0 or name not in now or name not in before:
        return None
    return max(0.0, now[name] - before[name]) / seconds


def view(now: Samples, before: Optional[Samples], seconds: float) -> list[Row]:
    """The rows of the view from the latest scrape and the one ``seconds`` before it (or None)."""
    old = _nodes(before) if before is not None else {}
    rows = []
    for (role, rank, host), values in sorted(_nodes(now).items()):
        prev = old.get((role, rank, host), {})
        row = Row(role, rank, host, values.get("psframework_node_up", 0.0) == 1.0)
        row.values["rss_mib"] = values.get("psframework_process_resident_bytes", 0.0) / 2**20
        if role == "worker":
            row.values["steps"] = values.get("psframework_worker_steps_total", 0.0)
            row.values["steps_per_s"] = _rate(values, prev, "psframework_worker_steps_total", seconds)
            row.values["wait_share"] = _rate(values, prev, "psframework_worker_wait_seconds_sum", seconds)
        elif role == "server":
            row.values["pushes_per_s"] = _rate(values, prev, "psframework_server_pushes_total", seconds)
            pushed = _rate(values, prev, "psframework_server_push_bytes_total", seconds)
            pulled = _rate(values, prev, "psframework_server_pull_bytes_total", seconds)
            row.values["mb_per_s"] = None if pushed is None or pulled is None else (pushed + pulled) / 1e6
            row.values["apply_share"] = _rate(values, prev, "psframework_server_apply_seconds_sum", seconds)
            row.values["queue"] = values.get("psframework_server_queue_depth", 0.0)
            count = _rate(values, prev, "psframework_server_staleness_steps_count", 1.0)
            total = _rate(values, prev, "psframework_server_staleness_steps_sum", 1.0)
            row.values["staleness"] = total / count if count else None
        rows.append(row)
    _mark(rows, "worker", "steps_per_s", min, "slowest")
    _mark(rows, "server", "apply_share", max, "busiest")
    return rows


def _mark(rows: list[Row], role: str, key: str, pick, label: str) -> None:
    candidates = [r for r in rows if r.role == role and r.up and r.values.get(key) is not None]
    if len(candidates) > 1:
        pick(candidates, key=lambda r: r.values[key]).highlight = label


def render(rows: list[Row], address: str, note: str = ""):
    """A rich renderable of the rows."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    def fmt(value: Optional[float], pattern: str) -> str:
        return "-" if value is None else pattern.format(value)

    workers = Table(title="workers", expand=True)
    for column in ("rank", "host", "steps", "steps/s", "waiting", "RSS MiB", ""):
        workers.add_column(column, justify="right" if column not in ("host", "") else "left")
    servers = Table(title="servers", expand=True)
    for column in ("rank", "host", "pushes/s", "MB/s", "applying", "queue", "staleness", "RSS MiB", ""):
        servers.add_column(column, justify="right" if column not in ("host", "") else "left")
    failures = []
    for row in rows:
        v = row.values
        style = "bold red" if row.highlight else None
        if not row.up:
            failures.append(f"{row.role} {row.rank} on {row.host} is down")
        if row.role == "worker":
            workers.add_row(str(row.rank), row.host, fmt(v["steps"], "{:.0f}"), fmt(v["steps_per_s"], "{:.2f}"),
                            fmt(v["wait_share"], "{:.0%}"), fmt(v["rss_mib"], "{:.0f}"), row.highlight, style=style)
        elif row.role == "server":
            servers.add_row(str(row.rank), row.host, fmt(v["pushes_per_s"], "{:.1f}"), fmt(v["mb_per_s"], "{:.1f}"),
                            fmt(v["apply_share"], "{:.0%}"), fmt(v["queue"], "{:.0f}"),
                            fmt(v["staleness"], "{:.1f}"), fmt(v["rss_mib"], "{:.0f}"), row.highlight, style=style)
    head = Text(f"psframework job at {address}  {note}".rstrip())
    lines = [Text(f"FAILED: {f}", style="bold red") for f in failures] or [Text("no failures", style="green")]
    return Group(head, workers, servers, *lines)


def watch(address: str, every: float, frames: Optional[int] = None, console=None) -> None:
    """Refresh the view every ``every`` seconds (``frames`` of them, or until Ctrl-C)."""
    from rich.console import Console
    from rich.live import Live

    console = console or Console()
    before: Optional[tuple[float, Samples]] = None
    shown = 0
    with Live(console=console, auto_refresh=False, transient=False) as live:
        while frames is None or shown < frames:
            try:
                at, samples = time.monotonic(), scrape(address)
            except (OSError, urllib.error.URLError) as exc:
                live.update(f"{address}: not answering ({exc}); the job may have ended. Retrying...", refresh=True)
            else:
                rows = view(samples, before[1] if before else None, at - before[0] if before else 0.0)
                live.update(render(rows, address, time.strftime("%H:%M:%S")), refresh=True)
                before = (at, samples)
                shown += 1
            if frames is None or shown < frames:
                time.sleep(every)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("address")
@click.option("--every", type=click.FloatRange(min=0.1), default=2.0, show_default=True, help="Seconds between refreshes.")
@click.option("--frames", type=click.IntRange(min=1), default=None, help="Stop after this many frames (default: Ctrl-C).")
def main(address: str, every: float, frames: Optional[int]) -> None:
    """Watch a running job: ADDRESS is its metrics endpoint (host:port or http://host:port/metrics)."""
    if not all(importlib.util.find_spec(name) for name in ("prometheus_client", "rich")):
        raise click.ClickException("ps-launch top needs prometheus-client and rich: "
                                   "pip install 'psframework[metrics]'")
    try:
        watch(endpoint(address), every, frames)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        pass


def endpoint(address: str) -> str:
    """``host:port`` or a URL -> the URL of the metrics endpoint."""
    if not address.startswith(("http://", "https://")):
        if ":" not in address:
            raise ConfigError(f"ps-launch top: {address!r} is no address; give host:port of the job's "
                              "--metrics-port (ps-launch prints it when the job is up)")
        address = f"http://{address}"
    return address if address.rstrip("/").endswith("/metrics") else address.rstrip("/") + "/metrics"


if __name__ == "__main__":
    main(prog_name="ps-launch top")
