"""The live view: rows computed from two scrapes, and the frame rich renders of them."""

from __future__ import annotations

import pytest

from psframework.errors import ConfigError
from psframework.top import endpoint, render, view

pytest.importorskip("prometheus_client", reason="prometheus-client is in the dev extras")
rich_console = pytest.importorskip("rich.console", reason="rich is in the dev extras")


def node(role: str, rank: int, **values: float) -> dict:
    labels = (("host", "h1"), ("rank", str(rank)), ("role", role))
    return {(name, labels): value for name, value in values.items()}


def scrape_at(t: float) -> dict:
    """Two workers (worker 1 at half the speed of worker 0, waiting more), two servers (server 1
    applying three times as long), and a worker 2 that died; ``t`` seconds into the job."""
    samples = {}
    samples.update(node("worker", 0, psframework_node_up=1, psframework_worker_steps_total=10 * t,
                        psframework_worker_wait_seconds_sum=0.2 * t, psframework_process_resident_bytes=300 * 2**20))
    samples.update(node("worker", 1, psframework_node_up=1, psframework_worker_steps_total=5 * t,
                        psframework_worker_wait_seconds_sum=0.6 * t))
    samples.update(node("worker", 2, psframework_node_up=0, psframework_worker_steps_total=7))
    for rank, apply in ((0, 0.1), (1, 0.3)):
        samples.update(node("server", rank, psframework_node_up=1, psframework_server_pushes_total=15 * t,
                            psframework_server_push_bytes_total=4e6 * t, psframework_server_pull_bytes_total=4e6 * t,
                            psframework_server_apply_seconds_sum=apply * t, psframework_server_queue_depth=rank,
                            psframework_server_staleness_steps_count=15 * t,
                            psframework_server_staleness_steps_sum=30 * t))
    return samples


def test_rates_between_two_scrapes_and_the_highlights():
    rows = {(r.role, r.rank): r for r in view(scrape_at(12.0), scrape_at(10.0), 2.0)}
    w0, w1, s0, s1 = rows["worker", 0], rows["worker", 1], rows["server", 0], rows["server", 1]
    assert w0.values["steps_per_s"] == pytest.approx(10) and w1.values["steps_per_s"] == pytest.approx(5)
    assert w0.values["wait_share"] == pytest.approx(0.2) and w1.values["wait_share"] == pytest.approx(0.6)
    assert w1.highlight == "slowest" and w0.highlight == ""
    assert s0.values["mb_per_s"] == pytest.approx(8.0) and s1.values["apply_share"] == pytest.approx(0.3)
    assert s0.values["staleness"] == pytest.approx(2.0)
    assert s1.highlight == "busiest" and s0.highlight == ""
    assert not rows["worker", 2].up and rows["worker", 2].highlight == ""


def test_the_first_frame_has_totals_and_no_rates():
    rows = {(r.role, r.rank): r for r in view(scrape_at(10.0), None, 0.0)}
    assert rows["worker", 0].values["steps"] == 100 and rows["worker", 0].values["steps_per_s"] is None
    assert all(r.highlight == "" for r in rows.values())


def test_a_rendered_frame_shows_every_node_the_highlights_and_the_failure():
    console = rich_console.Console(record=True, width=140)
    console.print(render(view(scrape_at(12.0), scrape_at(10.0), 2.0), "http://h1:9100/metrics"))
    text = console.export_text()
    assert "psframework job at http://h1:9100/metrics" in text
    cells = [[c for c in line.split() if c not in "│┃|"] for line in text.splitlines()]
    worker1 = next(c for c in cells if "slowest" in c)
    assert worker1[:2] == ["1", "h1"] and "5.00" in worker1 and "60%" in worker1
    server1 = next(c for c in cells if "busiest" in c)
    assert server1[:2] == ["1", "h1"] and "30%" in server1 and "8.0" in server1
    assert "FAILED: worker 2 on h1 is down" in text


def test_addresses_are_completed_or_refused():
    assert endpoint("h1:9100") == "http://h1:9100/metrics"
    assert endpoint("http://h1:9100/metrics") == "http://h1:9100/metrics"
    assert endpoint("http://h1:9100/") == "http://h1:9100/metrics"
    with pytest.raises(ConfigError, match="host:port"):
        endpoint("h1")
