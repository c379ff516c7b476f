"""The job's Prometheus endpoint: real jobs scraped over HTTP, the text parsed by prometheus-client."""

from __future__ import annotations

import os
import shutil
import sys
import time
import urllib.request

import pytest
import torch

import psframework as ps
from psframework.errors import ConfigError
from psframework.metrics import MetricsServer
from psframework.procs import spawn, stop_all
from psframework.top import scrape  # every sample: (name, sorted labels) -> value
from tests.threads import run_in_threads
from tests.ports import free_port

pytest.importorskip("prometheus_client", reason="prometheus-client is in the dev extras")

pytestmark = pytest.mark.timeout(60)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), float("nan"))


def scrape_until(address: str, done, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(address)
        if done(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def _buckets(samples: dict, name: str, **labels) -> dict[str, float]:
    want = tuple(sorted((k, str(v)) for k, v in labels.items()))
    return {dict(key)["le"]: v for (n, key), v in samples.items()
            if n == f"{name}_bucket" and tuple(kv for kv in key if kv[0] != "le") == want}


def test_a_scrape_counts_what_the_job_did(make_cluster):
    cluster = make_cluster(num_servers=2, num_workers=1, mode="sync", metrics_port=0)
    address = cluster.metrics_address
    assert address.startswith("http://127.0.0.1:") and address.endswith("/metrics")
    steps, numel = 5, 1000
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"a": torch.zeros(numel), "b": torch.zeros(numel)}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(steps):
            worker.push_pull({k: torch.ones(numel) for k in params}, into=params).wait(timeout=10)
        host = worker.membership.welcome.host
        pushes = {rank: s["pushes"] for rank, s in enumerate(worker.server_stats())}
        me = {"role": "worker", "rank": 0, "host": host}
        servers = [{"role": "server", "rank": r, "host": host} for r in range(2)]

        def caught_up(s: dict) -> bool:  # every node's heartbeat since the last step
            return value(s, "psframework_worker_steps_total", **me) == steps and all(
                value(s, "psframework_server_pushes_total", **labels) == pushes[labels["rank"]] for labels in servers)

        samples = scrape_until(address, caught_up)
    assert value(samples, "psframework_worker_steps_total", **me) == steps
    assert value(samples, "psframework_worker_step_seconds_count", **me) == steps - 1  # between steps
    assert value(samples, "psframework_worker_wait_seconds_count", **me) >= steps
    step_buckets = _buckets(samples, "psframework_worker_step_seconds", **me)
    assert step_buckets["+Inf"] == steps - 1 and list(step_buckets.values()) == sorted(step_buckets.values())
    nbytes = numel * 4
    for labels in servers:
        assert value(samples, "psframework_server_pushes_total", **labels) == pushes[labels["rank"]] == steps
        assert value(samples, "psframework_server_updates_total", **labels) == steps
        assert value(samples, "psframework_server_apply_seconds_count", **labels) == steps
        # the socket or the shared-memory lane, whichever this machine allows: the bytes are the same
        paths = {p: value(samples, "psframework_data_path_bytes_total", path=p, **labels) for p in ("socket", "lane")}
        assert sum(v for v in paths.values() if v == v) == (2 * steps + 1) * nbytes  # pushed, pulled, register()'s pull
        assert value(samples, "psframework_server_queue_depth", **labels) == 0
    for labels in (me, *servers, {"role": "scheduler", "rank": 0, "host": host}):
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


def test_staleness_tables_and_checkpoints_are_measured(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=1, num_workers=2, mode="async", metrics_port=0, checkpoint_dir=str(tmp_path))
    pushes = 5

    def work(_):
        with ps.init(scheduler=cluster.scheduler) as worker:
            worker.register({"w": torch.zeros(10)}, optimizer=ps.optim.SGD(lr=1.0),
                            tables={"emb": ps.nn.Embedding(100, 4)}, sparse_optimizer=ps.optim.SGD(lr=1.0))
            for _ in range(pushes):
                worker.push({"w": torch.ones(10)}).wait(timeout=10)
            worker.push_rows("emb", torch.tensor([1, 2, 3]), torch.ones(3, 4)).wait(timeout=10)
            worker.save_checkpoint(str(tmp_path))
            samples = None
            if worker.rank == 0:
                server = {"role": "server", "rank": 0, "host": worker.membership.welcome.host}
                samples = scrape_until(cluster.metrics_address, lambda s: value(
                    s, "psframework_server_staleness_steps_count", **server) == 2 * (pushes + 1)), server
            worker.barrier()
            return samples

    samples, server = next(r for r in run_in_threads(2, work) if r is not None)
    # every async push is one observation: the dense block's and the row channel's
    assert value(samples, "psframework_server_staleness_steps_count", **server) == 2 * (pushes + 1)
    assert value(samples, "psframework_server_staleness_steps_sum", **server) >= 0
    assert value(samples, "psframework_table_rows", table="emb", **server) == 3
    assert value(samples, "psframework_table_admissions_total", table="emb", **server) == 3
    assert value(samples, "psframework_table_evictions_total", table="emb", **server) == 0
    scheduler = {"role": "scheduler", "rank": 0, "host": server["host"]}
    assert value(samples, "psframework_checkpoint_seconds_count", **scheduler) == 1


@pytest.mark.parametrize("row_lane_bytes", [None, "0"], ids=["rows-through-lanes", "rows-over-socket"])
def test_row_pulls_and_pushes_are_counted_in_bytes_and_data_paths(make_cluster, monkeypatch, row_lane_bytes):
    """A row pull's answer is pulled bytes and a row push's ids and gradients pushed bytes, on the
    path they took, as for dense blocks."""
    if row_lane_bytes is not None:
        monkeypatch.setenv("PS_ROW_LANE_BYTES", row_lane_bytes)
    cluster = make_cluster(num_servers=2, num_workers=1, mode="async", metrics_port=0)
    rounds, dim, ids = 3, 4, torch.arange(40)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({}, optimizer=ps.optim.SGD(lr=1.0), tables={"emb": ps.nn.Embedding(100, dim)},
                        sparse_optimizer=ps.optim.SGD(lr=1.0))
        for _ in range(rounds):
            worker.pull_rows("emb", ids).wait(timeout=10)
            worker.push_rows("emb", ids, torch.ones(ids.numel(), dim)).wait(timeout=10)
        host = worker.membership.welcome.host
        servers = [{"role": "server", "rank": r, "host": host} for r in range(2)]
        path = "lane" if row_lane_bytes is None and worker.lanes.lanes else "socket"
        pulled, pushed = rounds * ids.numel() * dim * 4, rounds * ids.numel() * (8 + dim * 4)

        def total(samples: dict, name: str, **labels) -> float:
            got = [value(samples, name, **labels, **server) for server in servers]
            return sum(v for v in got if v == v)

        samples = scrape_until(cluster.metrics_address, lambda s: total(
            s, "psframework_server_pull_bytes_total") == pulled and total(s, "psframework_server_push_bytes_total") == pushed)
        worker.barrier()
    assert total(samples, "psframework_server_pull_bytes_total") == pulled
    assert total(samples, "psframework_server_push_bytes_total") == pushed
    assert total(samples, "psframework_data_path_bytes_total", path=path) == pulled + pushed


def test_a_restarted_server_is_counted_and_up_again(make_cluster, tmp_path):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="async", restart_servers=True,
                           checkpoint_dir=str(tmp_path), metrics_port=0)
    with ps.init(scheduler=cluster.scheduler) as worker:
        worker.register({"w": torch.zeros(10)}, optimizer=ps.optim.SGD(lr=1.0))
        worker.push({"w": torch.ones(10)}).wait(timeout=10)
        worker.save_checkpoint(str(tmp_path))
        host = worker.membership.welcome.host
        server = {"role": "server", "rank": 0, "host": host}
        scheduler = {"role": "scheduler", "rank": 0, "host": host}
        old = cluster.processes()["server-0"]
        old.kill()
        old.wait(timeout=10)
        down = scrape_until(cluster.metrics_address, lambda s: value(s, "psframework_node_up", **server) == 0.0)
        assert value(down, "psframework_node_up", **server) == 0.0
        cluster.restart_server(0)
        back = scrape_until(cluster.metrics_address, lambda s: value(s, "psframework_restarts_total", **scheduler) == 1
                            and value(s, "psframework_node_up", **server) == 1.0, timeout=20)
        assert value(back, "psframework_restarts_total", **scheduler) == 1
        assert value(back, "psframework_node_up", **server) == 1.0


@pytest.mark.gpu
def test_gpu_memory_of_a_gpu_server_is_reported(make_cluster):
    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", server_device="cuda", metrics_port=0)
    with ps.init(scheduler=cluster.scheduler) as worker:
        params = {"w": torch.zeros(1 << 20, device="cuda")}
        worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
        worker.push_pull({"w": torch.ones(1 << 20, device="cuda")}, into=params).wait(timeout=30)
        host = worker.membership.welcome.host
        server, me = {"role": "server", "rank": 0, "host": host}, {"role": "worker", "rank": 0, "host": host}
        samples = scrape_until(cluster.metrics_address,
                               lambda s: value(s, "psframework_gpu_memory_bytes", **server) >= 4 << 20)
    assert value(samples, "psframework_gpu_memory_bytes", **server) >= 4 << 20  # its shard, at least
    assert value(samples, "psframework_gpu_memory_bytes", **me) >= 4 << 20


def test_ps_launch_top_shows_a_running_job(make_cluster):
    import subprocess
    import threading

    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", metrics_port=0)
    stop, stepping = threading.Event(), threading.Event()

    def train() -> None:
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(1000)}
            worker.register(params, optimizer=ps.optim.SGD(lr=0.01))
            while not stop.is_set():
                worker.push_pull({"w": torch.ones(1000)}, into=params).wait(timeout=10)
                stepping.set()

    trainer = threading.Thread(target=train)
    trainer.start()
    try:
        assert stepping.wait(timeout=60), "the worker took no step"
        address = cluster.metrics_address.split("//", 1)[1].rsplit("/", 1)[0]  # host:port, as people type it
        result = subprocess.run([sys.executable, "-m", "psframework.launch", "top", address, "--frames", "2",
                                 "--every", "0.5"], capture_output=True, text=True, timeout=30)
    finally:
        stop.set()
        trainer.join(timeout=20)
    assert result.returncode == 0, result.stderr
    assert f"psframework job at {cluster.metrics_address}" in result.stdout
    assert "workers" in result.stdout and "servers" in result.stdout and "no failures" in result.stdout
    rows = [[c for c in line.split() if c not in "│┃"] for line in result.stdout.split("servers")[0].splitlines()]
    worker = next(cells for cells in rows if cells[:1] == ["0"])  # rank, host, steps, steps/s, ...
    assert float(worker[2]) >= 1 and float(worker[3]) > 0, result.stdout  # it steps while we watch


PROMETHEUS = shutil.which("prometheus")


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus is not installed (make sysdeps installs it as root)")
def test_a_real_prometheus_scrapes_the_job(make_cluster, tmp_path):
    import json

    cluster = make_cluster(num_servers=1, num_workers=1, mode="sync", metrics_port=0)
    target = cluster.metrics_address.split("//", 1)[1].rsplit("/", 1)[0]
    config, port = tmp_path / "prometheus.yml", free_port()
    config.write_text("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: psframework\n"
                      f"    static_configs:\n      - targets: ['{target}']\n")
    with open(tmp_path / "prometheus.log", "wb") as log:
        prometheus = spawn([PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                            f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    try:
        with ps.init(scheduler=cluster.scheduler) as worker:
            params = {"w": torch.zeros(100)}
            worker.register(params, optimizer=ps.optim.SGD(lr=1.0))
            for _ in range(3):
                worker.push_pull({"w": torch.ones(100)}, into=params).wait(timeout=10)
            query = f"http://127.0.0.1:{port}/api/v1/query?query=psframework_worker_steps_total"
            deadline, result = time.monotonic() + 40, []
            while time.monotonic() < deadline:
                try:
                    answer = json.loads(urllib.request.urlopen(query, timeout=5).read())
                    result = answer["data"]["result"]
                    if result and result[0]["value"][1] == "3":
                        break
                except OSError:
                    pass  # not listening yet
                time.sleep(0.5)
        assert result, (tmp_path / "prometheus.log").read_text()[-2000:]
        series = result[0]
        assert series["value"][1] == "3"
        assert series["metric"]["role"] == "worker" and series["metric"]["rank"] == "0"
        assert series["metric"]["job"] == "psframework" and series["metric"]["instance"] == target
    finally:
        stop_all([prometheus])
