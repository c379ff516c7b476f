"""The job's Prometheus endpoint: the scheduler serves every node's counters, carried on the
heartbeats it already receives, labelled by ``role``, ``rank`` and ``host``.

The scheduler's loop publishes a snapshot of its roster (``publish``); the HTTP thread of
prometheus-client only ever reads the latest snapshot, never the roster itself.
prometheus-client is an optional dependency (``pip install psframework[metrics]``).
"""

from __future__ import annotations

import bisect
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional

from .errors import ConfigError

SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEPS = (0, 1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class Metric:
    name: str  # without _total: prometheus-client adds it to counters
    kind: str  # counter, gauge or histogram
    help: str
    buckets: tuple = ()
    label: str = ""  # one more label beyond role, rank and host


METRICS = {m.name: m for m in [
    Metric("psframework_worker_steps", "counter", "Steps the worker completed (every server answered)"),
    Metric("psframework_worker_step_seconds", "histogram", "Seconds from one completed step to the next", SECONDS),
    Metric("psframework_worker_wait_seconds", "histogram", "Seconds a worker was blocked waiting for answers", SECONDS),
    Metric("psframework_server_pushes", "counter", "Pushes the server received"),
    Metric("psframework_server_updates", "counter", "Optimizer updates the server applied to its blocks"),
    Metric("psframework_server_push_bytes", "counter", "Bytes of gradients pushed to the server, as they came"),
    Metric("psframework_server_pull_bytes", "counter", "Bytes of values the server answered pulls with"),
    Metric("psframework_server_apply_seconds", "histogram", "Seconds of one optimizer step on the server (host time "
                                                           "to launch it, for shards on a GPU)", SECONDS),
    Metric("psframework_server_staleness_steps", "histogram", "How many pushes behind the freshest worker an "
                                                             "applied push was (async and ssp)", STEPS),
    Metric("psframework_server_queue_depth", "gauge", "Pulls waiting for their step, and answers waiting for room"),
    Metric("psframework_data_path_bytes", "counter", "Bytes pushed and pulled by data path", label="path"),
    Metric("psframework_table_rows", "gauge", "Rows an embedding table holds on the server", label="table"),
    Metric("psframework_table_evictions", "counter", "Rows evicted from an embedding table", label="table"),
    Metric("psframework_table_admissions", "counter", "Rows admitted into an embedding table", label="table"),
    Metric("psframework_process_resident_bytes", "gauge", "Resident memory of the process"),
    Metric("psframework_gpu_memory_bytes", "gauge", "GPU memory the process's tensors hold (torch)"),
    Metric("psframework_checkpoint_seconds", "histogram", "Seconds from a checkpoint's start to its last file",
           (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)),
    Metric("psframework_restarts", "counter", "Server processes that joined again after their rank died"),
]}


def stat_key(name: str, label: str = "") -> str:
    """The heartbeat stats key of a metric (``name|value`` for one with its own label)."""
    return f"{name}|{label}" if label else name


class Recorder:
    """A process's counters and histograms, as flat heartbeat stats. Written by its own loop;
    ``stats()`` may run on the heartbeat thread (a histogram's count is its buckets' sum)."""

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._buckets: dict[str, list[int]] = {}
        self._sums: dict[str, float] = {}
        self._ticks: dict[str, float] = {}

    def tick(self, name: str) -> None:
        """Observe the seconds since the last tick of ``name`` (none the first time)."""
        now, last = time.monotonic(), self._ticks.get(name)
        self._ticks[name] = now
        if last is not None:
            self.observe(name, now - last)

    def add(self, name: str, amount: float = 1, label: str = "") -> None:
        key = stat_key(name, label)
        self._values[key] = self._values.get(key, 0) + amount

    def set(self, name: str, value: float, label: str = "") -> None:
        self._values[stat_key(name, label)] = value

    def observe(self, name: str, value: float) -> None:
        bounds = METRICS[name].buckets
        counts = self._buckets.setdefault(name, [0] * (len(bounds) + 1))
        counts[bisect.bisect_left(bounds, value)] += 1
        self._sums[name] = self._sums.get(name, 0.0) + value

    def stats(self) -> dict[str, float]:
        flat = dict(self._values)
        for name, counts in list(self._buckets.items()):
            flat.update({f"{name}.b{i}": n for i, n in enumerate(counts)})
            flat[f"{name}.sum"] = self._sums.get(name, 0.0)
        return flat


def process_stats() -> dict[str, float]:
    """What every node reports of its process: resident memory, and GPU memory once it uses a GPU."""
    stats = {"psframework_process_resident_bytes": resident_bytes() or 0}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        stats["psframework_gpu_memory_bytes"] = sum(torch.cuda.memory_allocated(d)
                                                    for d in range(torch.cuda.device_count()))
    return stats


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
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self._lock:
            samples = self._samples
        labels = ["role", "rank", "host"]
        up = GaugeMetricFamily("psframework_node_up", "1 while the node is live, 0 once it died or left", labels=labels)
        age = GaugeMetricFamily("psframework_heartbeat_age_seconds", "Seconds since the node's last heartbeat",
                                labels=labels)
        kinds = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily, "histogram": HistogramMetricFamily}
        families = {m.name: kinds[m.kind](m.name, m.help, labels=labels + ([m.label] if m.label else []))
                    for m in METRICS.values()}
        for s in samples:
            values = [s.role, str(s.rank), s.host]
            up.add_metric(values, 1.0 if s.up else 0.0)
            age.add_metric(values, s.heartbeat_age_s)
            for key, number in s.stats.items():
                name, _, label = key.partition("|")
                metric = METRICS.get(name)
                if metric is not None and metric.kind != "histogram":
                    families[name].add_metric(values + ([label] if metric.label else []), float(number))
            for metric in METRICS.values():
                if metric.kind == "histogram" and f"{metric.name}.sum" in s.stats:
                    families[metric.name].add_metric(values, *_buckets(metric, s.stats))
        yield from (up, age, *families.values())

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _buckets(metric: Metric, stats: dict) -> tuple[list, float]:
    """Cumulative (le, count) pairs and the sum of a histogram from heartbeat stats."""
    cumulative, pairs = 0, []
    for i, bound in enumerate([*metric.buckets, float("inf")]):
        cumulative += stats.get(f"{metric.name}.b{i}", 0)
        pairs.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
    return pairs, stats[f"{metric.name}.sum"]


__all__ = ["METRICS", "Metric", "MetricsServer", "NodeSample", "Recorder", "process_stats", "resident_bytes"]
