"""loadtest/bench_sla.py: goodput at a floor from a sweep's rounds, ratios to `scheduled`, the report."""

from __future__ import annotations

import pytest

from dspark_serve.loadtest import bench_sla
from dspark_serve.loadtest.sweep import combine_rounds


def _round(speeds, tokens=100, duration=10.0):
    reqs = [{"ok": True, "tokens_per_s_per_user": s, "output_tokens": tokens} for s in speeds]
    reqs.append({"ok": False, "tokens_per_s_per_user": None, "output_tokens": 0})  # a failure: not counted
    summary = {"output_token_throughput": tokens * len(speeds) / duration, "duration_s": duration,
               "tokens_per_s_per_user": {"mean": sum(speeds) / len(speeds)}, "requests_completed": len(speeds)}
    return {"concurrency": 8, "summary": summary, "requests": reqs, "server_metrics": {"engine": {
        "sla_admission_holds": 3, "sla_floor_draft_tokens": 7}}}


def _sweep():
    sched = [_round([10, 20, 30, 40]), _round([15, 25, 35, 45])]
    sla = [_round([30, 30, 31, 29], duration=12.0), _round([32, 33, 34, 35], duration=12.0)]
    return {"configs": [{"name": "scheduled", "points": [combine_rounds(sched, None)]},
                        {"name": "sla-50", "points": [combine_rounds(sla, sched)]}]}


def test_goodput_of_one_round():
    g = bench_sla.goodput([[10.0, 100], [30.0, 50], [None, 1]], 10.0, 20.0)
    assert g == {"requests_per_s": 0.1, "output_tok_s": 5.0, "missed_share": pytest.approx(2 / 3)}


def test_analyse_and_report():
    rows = bench_sla.analyse(_sweep(), {"sla-50": 30.0})
    (row,) = rows
    sched, sla = row["configs"]["scheduled"], row["configs"]["sla-50"]
    # scheduled: 2 of 4 reach 30 in each round (20 tokens/s of goodput); sla-50: 3 then 4 of 4 in 12 s
    assert sched["goodput_output_tok_s"] == pytest.approx(20.0) and sched["missed_share"] == pytest.approx(0.5)
    assert sla["goodput_output_tok_s"] == pytest.approx((25.0 + 100 * 4 / 12) / 2)
    vs = row["sla_vs_scheduled"]
    assert vs["goodput_tokens"] == pytest.approx([25.0 / 20.0, (400 / 12) / 20.0])
    assert vs["throughput"] == pytest.approx([(400 / 12) / 40.0] * 2)
    assert sla["admission_holds"] == 3 and sla["floor_draft_tokens"] == 7
    res = {"command": "x", "machine": {"cpu": "cpu", "cores": 2}, "git": {"commit": "abc1234", "dirty": False},
           "single_stream": 60.0, "single_stream_source": "given", "floors": {"sla-50": 30.0}, "rounds": 2,
           "workload": "w", "points": rows}
    md = bench_sla.markdown(res)
    assert "| sla-50 (30) | 8 | sla-50 |" in md and "1.46x" in md
    # scheduled missed the floor for half its requests, sla-50 gained goodput but lost 17% throughput
    assert row["bar"] == "not met" and "| not met |" in md
    # an open-loop sweep's rows say their Poisson rate and cap
    rate_rows = bench_sla.analyse({**_sweep(), "request_rate": 2.5}, {"sla-50": 30.0})
    assert rate_rows[0]["request_rate"] == 2.5
    assert "| sla-50 (30) | 2.50 req/s (<= 8) | sla-50 |" in bench_sla.markdown({**res, "points": rate_rows})


def test_the_bar():
    assert bench_sla.bar(0.05, {"goodput_requests_median": 1.0, "throughput_median": 1.0}) == "n/a"
    assert bench_sla.bar(0.3, {"goodput_requests_median": 1.25, "throughput_median": 0.96}) == "met"
    assert bench_sla.bar(0.3, {"goodput_requests_median": 1.15, "throughput_median": 0.99}) == "not met"
    assert bench_sla.bar(0.3, {"goodput_requests_median": 1.5, "throughput_median": 0.90}) == "not met"
    assert bench_sla.bar(1.0, {"goodput_requests_median": None, "throughput_median": 1.0}, 0.2) == "met"
    assert bench_sla.bar(1.0, {"goodput_requests_median": None, "throughput_median": 1.0}, 0.0) == "not met"


def test_request_rates():
    sweep = {"configs": [{"name": "off", "points": []}, {"name": "scheduled", "points": [
        {"concurrency": 8, "summary": {"request_throughput": 1.0}},
        {"concurrency": 32, "summary": {"request_throughput": 3.0}}]}]}
    assert bench_sla.request_rates("auto", sweep, 32) == pytest.approx([1.8, 2.7])
    assert bench_sla.request_rates("0.5,2", sweep, 32) == [0.5, 2.0]
    assert bench_sla.request_rates("none", sweep, 32) == []


def test_a_one_round_sweep_is_its_own_round():
    p = _round([40, 50])
    (r,) = bench_sla._rounds(p)
    assert r["requests"] == [[40, 100], [50, 100]] and r["duration_s"] == 10.0
