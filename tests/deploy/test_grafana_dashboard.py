"""deploy/grafana/dspark-serve.json: importable, laid out, every query valid PromQL on documented metrics."""

from __future__ import annotations

import json

import pytest

from deploy_testing import DASHBOARD, as_promql, dashboard_exprs, documented_metrics, metric_names, resolve_series


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_a_recent_grafana_dashboard(dashboard):
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] == "dspark-serve"
    assert dashboard["id"] is None  # Grafana assigns it on import


def test_datasource_is_a_prometheus_variable_used_everywhere(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"]["uid"] == "${datasource}"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"


def test_panel_ids_are_unique_and_every_panel_has_a_place(dashboard):
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in dashboard["panels"]:
        g = panel["gridPos"]
        assert g["w"] > 0 and g["h"] > 0 and 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine


def test_every_panel_queries_something(dashboard):
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and "dspark_" in target["expr"], panel["title"]


def test_required_views_are_there(dashboard):
    exprs = "\n".join(dashboard_exprs())
    for needle in (
        "rate(dspark_request_success_total", "rate(dspark_request_errors_total",
        "histogram_quantile(0.99, sum by (le) (rate(dspark_time_to_first_token_seconds_bucket",
        "dspark_inter_token_latency_seconds_bucket", "dspark_e2e_request_latency_seconds_bucket",
        "dspark_num_requests_running", "dspark_num_requests_waiting",
        "dspark_kv_cache_used_blocks", "dspark_kv_cache_usage_ratio", "rate(dspark_generation_tokens_total",
        "dspark_spec_decode_num_accepted_tokens_per_pos_total", "dspark_spec_decode_verify_length_bucket",
        "rate(dspark_engine_preemptions_total",
    ):
        assert needle in exprs, needle
    # tau = (accepted + drafts) / drafts
    assert any("dspark_spec_decode_num_accepted_tokens_total" in e and e.count("dspark_spec_decode_num_drafts_total") == 2
               for e in dashboard_exprs())


def test_queries_use_only_documented_metrics():
    documented = documented_metrics()
    assert len(documented) > 20
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        for name in names:
            assert resolve_series(name, documented), f"{name} (in {expr!r}) is not a series of docs/metrics.md"


def test_queries_parse_as_promql():
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    for expr in dashboard_exprs():
        try:
            promql.parse(as_promql(expr))
        except ValueError as e:
            pytest.fail(f"{expr!r}: {e}")
