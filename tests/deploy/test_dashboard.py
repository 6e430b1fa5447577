"""The Grafana dashboard (deploy/grafana/hotslot-dashboard.json) checked offline: a dashboard Grafana imports, on a
Prometheus data source chosen at import, whose every query names metrics the services serve (the README's table,
itself checked against the services by tests/unit/test_service_metrics.py) and covers what an operator watches."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "hotslot-dashboard.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def graphs(dashboard: dict) -> list[dict]:
    return [panel for panel in dashboard["panels"] if panel["type"] != "row"]


def readme_metrics() -> set[str]:
    section = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(hotslot_\w+)` \|", section, re.MULTILINE))


def test_the_dashboard_is_importable_on_a_chosen_prometheus_data_source(dashboard):
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in graphs(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]


def test_every_query_names_metrics_the_services_serve(dashboard):
    known = readme_metrics()
    for panel in graphs(dashboard):
        for target in panel["targets"]:
            for name in re.findall(r"\bhotslot_\w+", target["expr"]):
                assert re.sub(r"_(bucket|count|sum)$", "", name) in known, f"{panel['title']}: {name}"


def test_the_panels_an_operator_needs_are_there(dashboard):
    queries = " ".join(t["expr"] for panel in graphs(dashboard) for t in panel["targets"])
    for needed in ("hotslot_grpc_server_requests_total", "hotslot_grpc_server_duration_seconds_bucket",
                   'grpc_code!="OK"', "hotslot_executor_queue_depth", "hotslot_executor_requests_total",
                   "hotslot_executor_load_duration_seconds_bucket", "hotslot_executor_swap_duration_seconds_bucket",
                   "hotslot_executor_denoise_duration_seconds_bucket", "hotslot_executor_tier_bytes",
                   "hotslot_storage_cache_hits_total", "hotslot_storage_cache_fetched_bytes_total",
                   "hotslot_router_placements_total", "hotslot_router_refusals_total"):
        assert needed in queries, needed
