"""deploy/prometheus/alerts.yaml: a valid rule file whose expressions parse and read documented metrics."""

from __future__ import annotations

import re

import pytest

from deploy_testing import ALERTS, alert_rules, documented_metrics, metric_names, resolve_series

EXPECTED = {"DsparkQueueGrowing", "DsparkKVCacheNearlyFull", "DsparkSpeculationTauCollapsed",
            "DsparkHighErrorRatio", "DsparkNoSuccessfulRequests"}


def test_rule_file_shape():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == EXPECTED
    for r in rules:
        assert set(r) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical")
        assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_expressions_parse_as_promql():
    promql = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    for r in alert_rules():
        try:
            promql.parse(r["expr"])
        except ValueError as e:
            pytest.fail(f"{r['alert']}: {e}")


def test_expressions_use_only_documented_metrics():
    documented = documented_metrics()
    for r in alert_rules():
        for name in metric_names(r["expr"]):
            assert resolve_series(name, documented), f"{r['alert']}: {name} is not a series of docs/metrics.md"


def test_tau_alert_only_watches_pods_that_speculate():
    tau = next(r for r in alert_rules() if r["alert"] == "DsparkSpeculationTauCollapsed")
    assert 'dspark_model_info{speculative_method!="none"}' in tau["expr"]
    assert "and on (job, instance)" in tau["expr"]


def test_alerts_without_traffic_history_still_evaluate():
    """Series that appear only after the first request are backed by dspark_model_info (always there)."""
    text = ALERTS.read_text()
    no_success = next(r for r in alert_rules() if r["alert"] == "DsparkNoSuccessfulRequests")
    assert "or sum by (job, instance) (dspark_model_info) * 0" in no_success["expr"]
    assert "groups:" in text
