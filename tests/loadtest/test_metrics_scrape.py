"""tau, verification budget and acceptance per position from two /metrics scrapes."""

from __future__ import annotations

import pytest

from dspark_serve.loadtest.server_metrics import delta, parse_exposition, spec_decode_stats, summarize_scrapes


def exposition(drafts, draft_tokens, accepted, proposed, per_pos: dict, verify_counts: dict, gen_tokens) -> str:
    """Text in the shape dspark serve's /metrics has (counters with _total, integer `le` buckets)."""
    lines = [
        "# HELP dspark_num_requests_running Requests in the running batch",
        "# TYPE dspark_num_requests_running gauge",
        "dspark_num_requests_running 0.0",
        "# HELP dspark_generation_tokens_total Output tokens generated",
        "# TYPE dspark_generation_tokens_total counter",
        f"dspark_generation_tokens_total {float(gen_tokens)}",
        "# HELP dspark_request_errors_total HTTP requests answered with an error",
        "# TYPE dspark_request_errors_total counter",
        'dspark_request_errors_total{code="429"} 3.0',
    ]
    for name, v in (("num_drafts", drafts), ("num_proposed_tokens", proposed),
                    ("num_draft_tokens", draft_tokens), ("num_accepted_tokens", accepted)):
        lines += [f"# HELP dspark_spec_decode_{name}_total x", f"# TYPE dspark_spec_decode_{name}_total counter",
                  f"dspark_spec_decode_{name}_total {float(v)}"]
    for name, v in (("drafted_steps", drafts // 2), ("budget_plain_steps", drafts), ("budget_forecast_steps", drafts // 4)):
        lines += [f"# TYPE dspark_spec_decode_{name}_total counter", f"dspark_spec_decode_{name}_total {float(v)}"]
    lines += ["# TYPE dspark_spec_decode_budget_verdicts_total counter",
              f'dspark_spec_decode_budget_verdicts_total{{outcome="paid"}} {float(drafts // 5)}',
              f'dspark_spec_decode_budget_verdicts_total{{outcome="lost"}} {float(drafts // 10)}']
    lines += ["# HELP dspark_spec_decode_num_accepted_tokens_per_pos_total x",
              "# TYPE dspark_spec_decode_num_accepted_tokens_per_pos_total counter"]
    lines += [f'dspark_spec_decode_num_accepted_tokens_per_pos_total{{position="{k}"}} {float(v)}'
              for k, v in per_pos.items()]
    lines += ["# HELP dspark_spec_decode_verify_length x", "# TYPE dspark_spec_decode_verify_length histogram"]
    for le in list(range(17)) + [24, 32]:
        c = sum(v for length, v in verify_counts.items() if length <= le)
        lines.append(f'dspark_spec_decode_verify_length_bucket{{le="{float(le)}"}} {float(c)}')
    total = sum(verify_counts.values())
    lines += [f'dspark_spec_decode_verify_length_bucket{{le="+Inf"}} {float(total)}',
              f"dspark_spec_decode_verify_length_count {float(total)}",
              f"dspark_spec_decode_verify_length_sum {float(sum(k * v for k, v in verify_counts.items()))}"]
    return "\n".join(lines) + "\n"


# Before: 10 rounds verifying 3 tokens (and 2 rounds where the scheduler chose 0), 12 accepted.
BEFORE = exposition(10, 30, 12, 70, {1: 7, 2: 4, 3: 1}, {0: 2, 3: 10}, 100)
# After: 20 more verifying rounds, 10 of length 3 and 10 of length 4, 2 more of length 0; 40 more accepted.
AFTER = exposition(30, 100, 52, 210, {1: 25, 2: 17, 3: 8, 4: 2}, {0: 4, 3: 20, 4: 10}, 400)


def test_tau_budget_and_acceptance_per_position_of_a_point():
    s = summarize_scrapes(BEFORE, AFTER)["spec_decode"]
    assert (s["rounds"], s["draft_tokens"], s["accepted_tokens"], s["proposed_tokens"]) == (20, 70, 40, 140)
    assert s["tau"] == pytest.approx((40 + 20) / 20) == 3.0
    assert s["acceptance_rate"] == pytest.approx(40 / 70)
    assert s["rounds_scheduled"] == 22
    assert s["mean_verify_budget"] == pytest.approx(70 / 22)  # the histogram's mean, l_r = 0 rounds included
    assert s["mean_verify_length_when_verifying"] == pytest.approx(70 / 20)
    assert (s["drafted_steps"], s["budget_plain_steps"], s["budget_forecast_steps"]) == (10, 20, 5)  # 15 - 5, 30 - 10, 7 - 2
    assert s["budget_verdicts"] == {"paid": 4, "lost": 2}
    per = {p["position"]: p for p in s["acceptance_per_position"]}
    assert sorted(per) == [1, 2, 3, 4]
    assert [per[k]["accepted"] for k in range(1, 5)] == [18, 13, 7, 2]
    assert [per[k]["acceptance_per_round"] for k in range(1, 5)] == pytest.approx([18 / 20, 13 / 20, 7 / 20, 2 / 20])
    # Position 4 was verified only in the 10 rounds of length 4.
    assert [per[k]["rounds_verifying"] for k in range(1, 5)] == [20, 20, 20, 10]
    assert [per[k]["acceptance_given_verified"] for k in range(1, 5)] == pytest.approx(
        [18 / 20, 13 / 20, 7 / 20, 2 / 10])


def test_engine_counters_and_first_scrape():
    m = summarize_scrapes(BEFORE, AFTER)
    assert m["engine"]["generation_tokens"] == 300 and m["engine"]["errors_by_code"] == {}
    first = summarize_scrapes(None, AFTER)  # no earlier scrape: totals since the server started
    assert first["spec_decode"]["tau"] == pytest.approx((52 + 30) / 30)
    assert first["engine"]["errors_by_code"] == {"429": 3.0}


def test_speculation_off_and_peers():
    off = exposition(0, 0, 0, 0, {}, {}, 50)
    s = summarize_scrapes(off, off)["spec_decode"]
    assert s["rounds"] == 0 and s["tau"] is None and s["mean_verify_budget"] is None
    assert s["acceptance_per_position"] == []
    peer = "# TYPE llamacpp_tokens_predicted_total counter\nllamacpp_tokens_predicted_total 12.0\n"
    assert summarize_scrapes(peer, peer) == {"spec_decode": None, "engine": None}
    assert summarize_scrapes(None, None) is None
    assert summarize_scrapes(None, "this is { not prometheus") is None


def test_parse_matches_the_real_exporter():
    """The names parsed here are the ones server/metrics.py exposes (same snapshot -> same numbers)."""
    from prometheus_client import CollectorRegistry, generate_latest

    from dspark_serve.server.metrics import EngineCollector

    class Engine:
        def __init__(self, drafts, accepted, per_pos, counts):
            self.s = {"kv_used_blocks": 0, "kv_total_blocks": 8, "num_running": 0, "num_waiting": 0,
                      "finished": {}, "aborted": 0, "prompt_tokens": 0, "generation_tokens": 0, "preemptions": 0,
                      "spec_num_drafts": drafts, "spec_num_proposed_tokens": 7 * drafts,
                      "spec_num_draft_tokens": sum(k * v for k, v in counts.items()),
                      "spec_num_accepted_tokens": accepted, "spec_accepted_per_pos": per_pos,
                      "spec_verify_length_counts": counts, "spec_drafted_steps": drafts // 2,
                      "spec_budget_plain_steps": drafts, "spec_budget_forecast_steps": drafts // 4,
                      "spec_budget_verdicts": {"paid": drafts // 5, "lost": drafts // 10}}

        def stats(self):
            return self.s

    def render(engine) -> str:
        r = CollectorRegistry()
        r.register(EngineCollector(engine))
        return generate_latest(r).decode()

    before = render(Engine(10, 12, [7, 4, 1], {0: 2, 3: 10}))
    after = render(Engine(30, 52, [25, 17, 8, 2], {0: 4, 3: 20, 4: 10}))
    real = summarize_scrapes(before, after)["spec_decode"]
    canned = summarize_scrapes(BEFORE, AFTER)["spec_decode"]
    assert real == canned


def test_delta_of_new_series():
    a = parse_exposition('# TYPE x_total counter\nx_total{position="1"} 5.0\n')
    b = parse_exposition('# TYPE x_total counter\nx_total{position="1"} 7.0\nx_total{position="2"} 1.0\n')
    assert delta(b, a) == {("x_total", (("position", "1"),)): 2.0, ("x_total", (("position", "2"),)): 1.0}
    assert spec_decode_stats(delta(b, a)) is None
