"""examples/grafana-dashboard.json: valid, and every series it queries is one the scheduler exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from psframework.metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}


def exported() -> set[str]:
    names = {"psframework_node_up", "psframework_heartbeat_age_seconds"}
    for metric in METRICS.values():
        names.update(metric.name + suffix for suffix in SUFFIXES[metric.kind])
    return names


def test_every_panel_queries_exported_series_and_every_metric_has_a_panel():
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried.update(re.findall(r"psframework_\w+", target["expr"]))
    assert queried <= exported(), sorted(queried - exported())
    missing = [m.name for m in METRICS.values() if not any(q.startswith(m.name) for q in queried)]
    assert not missing, f"metrics without a panel: {missing}"
