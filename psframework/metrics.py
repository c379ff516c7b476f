"""The job's Prometheus endpoint: the scheduler serves every node's counters, carried on the
heartbeats it already receives, labelled by ``role``, ``rank`` and ``host``.

The scheduler's loop publishes a snapshot of its roster (``publish``); the HTTP thread of
prometheus-client only ever reads the latest snapshot, never the roster itself.
prometheus-client is an optional dependency (``pip install psframework[metrics]``).
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .errors import ConfigError

# heartbeat stats key -> (metric name without _total, help, role that reports it)
_COUNTERS = {
    "steps": ("psframework_worker_steps", "Steps the worker completed (every server answered)", "worker"),
    "pushes": ("psframework_server_pushes", "Pushes the server received", "server"),
    "applied": ("psframework_server_updates", "Optimizer updates the server applied to its blocks", "server"),
}


@dataclass(frozen=True)
class NodeSample:
    """What the scheduler knows of one node at one moment."""

    role: str
    rank: int
    host: str
    up: bool
    heartbeat_age_s: float
    stats: dict = field(default_factory=dict)


def resident_bytes() -> Optional[int]:
    """This process's resident memory, from /proc (None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class MetricsServer:
    """An HTTP ``/metrics`` endpoint on ``bind_host:port`` (0: a free port, see ``port``)."""

    def __init__(self, bind_host: str, port: int):
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError:
            raise ConfigError("a metrics port was given (PS_METRICS_PORT / --metrics-port) but prometheus-client "
                              "is not installed: pip install 'psframework[metrics]'") from None
        self._lock = threading.Lock()
        self._samples: list[NodeSample] = []
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        try:
            self._httpd, self._thread = start_http_server(port, addr=bind_host, registry=registry)
        except OSError as exc:
            raise ConfigError(f"cannot serve metrics on {bind_host}:{port}: {exc.strerror or exc}; "
                              "pick another --metrics-port (0: any free port)") from None
        self.port: int = self._httpd.server_port

    def publish(self, samples: list[NodeSample]) -> None:
        with self._lock:
            self._samples = samples

    def collect(self) -> Iterator:
        """prometheus-client's collector protocol: called on the HTTP thread at every scrape."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            samples = self._samples
        labels = ["role", "rank", "host"]
        up = GaugeMetricFamily("psframework_node_up", "1 while the node is live, 0 once it died or left", labels=labels)
        age = GaugeMetricFamily("psframework_heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                                labels=labels)
        rss = GaugeMetricFamily("psframework_process_resident_bytes", "Resident memory of the node's process",
                                labels=labels)
        counters = {key: CounterMetricFamily(name, text, labels=["rank", "host"])
                    for key, (name, text, _) in _COUNTERS.items()}
        for s in samples:
            values = [s.role, str(s.rank), s.host]
            up.add_metric(values, 1.0 if s.up else 0.0)
            age.add_metric(values, s.heartbeat_age_s)
            if "rss_bytes" in s.stats:
                rss.add_metric(values, float(s.stats["rss_bytes"]))
            for key, (_, _, role) in _COUNTERS.items():
                if s.role == role and key in s.stats:
                    counters[key].add_metric([str(s.rank), s.host], float(s.stats[key]))
        yield from (up, age, rss, *counters.values())

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


__all__ = ["MetricsServer", "NodeSample", "resident_bytes"]
