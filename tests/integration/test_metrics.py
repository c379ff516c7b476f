"""The job's Prometheus endpoint: real jobs scraped over HTTP, the text parsed by prometheus-client."""

from __future__ import annotations

import os
import sys
import time
import urllib.request

import pytest
import torch

import psframework as ps
from psframework.errors import ConfigError
from psframework.metrics import MetricsServer
from psframework.procs import spawn, stop_all

pytest.importorskip("prometheus_client", reason="prometheus-client is in the dev extras")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    """Every sample of the endpoint: (name, sorted labels) -> value."""
    text = urllib.request.urlopen(address, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), float("nan"))


def scrape_until(address: str, done, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(address)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_a_scrape_counts_what_the_job_did(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", metrics_port=0)
    address = cluster.metrics_address
    assert address.startswith("http://127.0.0.1:") and address.endswith("/metrics")
    steps = 5
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(steps):
            worker.push_pull({k: torch.ones(1000) for k in params}, into=params).wait(timeout=10)
        host = worker.membership.welcome.host
        pushes = {rank: s["pushes"] for rank, s in enumerate(worker.server_stats())}

        def caught_up(s: dict) -> bool:  # every node's heartbeat since the last step
            return value(s, "psframework_worker_steps_total", rank=0, host=host) == steps and all(
                value(s, "psframework_server_pushes_total", rank=r, host=host) == pushes[r] for r in range(2))

        samples = scrape_until(address, caught_up)
        assert value(samples, "psframework_worker_steps_total", rank=0, host=host) == steps
        for rank in range(2):
            assert pushes[rank] >= 1
            assert value(samples, "psframework_server_pushes_total", rank=rank, host=host) == pushes[rank]
        for role, rank in (("worker", 0), ("server", 0), ("server", 1)):
            labels = {"role": role, "rank": rank, "host": host}
            assert value(samples, "psframework_node_up", **labels) == 1.0
            assert 0 <= value(samples, "psframework_heartbeat_age_seconds", **labels) < 2.0
            assert value(samples, "psframework_process_resident_bytes", **labels) > 10e6


def test_a_killed_worker_is_down(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", elastic=True, metrics_port=0)
    script = ("import time, torch, psframework as ps\n"
              "w = ps.init()\n"
              "w.register({'a': torch.zeros(4)}, optimizer=ps.optim.SGD(lr=1.0))\n"
              "print('registered', w.rank, flush=True)\n"
              "time.sleep(60)\n")
    other = spawn([sys.executable, "-c", script], {**cluster.env(), "PYTHONPATH": os.getcwd()})
    try:
        with ps.init(scheduler=cluster.scheduler) as worker:
            worker.register({"a": torch.zeros(4)}, optimizer=ps.optim.SGD(lr=1.0))
            host, gone = worker.membership.welcome.host, 1 - worker.rank
            down = {"role": "worker", "rank": gone, "host": host}
            assert value(scrape_until(address := cluster.metrics_address,
                                      lambda s: value(s, "psframework_node_up", **down) == 1.0),
                         "psframework_node_up", **down) == 1.0
            other.kill()
            samples = scrape_until(address, lambda s: value(s, "psframework_node_up", **down) == 0.0)
            assert value(samples, "psframework_node_up", **down) == 0.0
            assert value(samples, "psframework_node_up", role="worker", rank=worker.rank, host=host) == 1.0
            assert value(samples, "psframework_heartbeat_age_seconds", **down) >= 2.0
    finally:
        stop_all([other])


def test_without_prometheus_client_a_metrics_port_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    with pytest.raises(ConfigError, match=r"pip install 'psframework\[metrics\]'"):
        MetricsServer("127.0.0.1", 0)


def test_a_busy_metrics_port_is_a_clear_error():
    first = MetricsServer("127.0.0.1", 0)
    try:
        with pytest.raises(ConfigError, match=f"cannot serve metrics on 127.0.0.1:{first.port}"):
            MetricsServer("127.0.0.1", first.port)
    finally:
        first.close()
