"""/metrics: parses, has every family docs/metrics.md lists, and counts what happened; the access log."""

from __future__ import annotations

import re

import httpx
from prometheus_client.parser import text_string_to_metric_families

from server_helpers import REPO, chat_body, metric_value, server_idle, wait_until

DOC = REPO / "docs" / "metrics.md"


def documented_metrics() -> list[str]:
    """Names in the first column of the tables in docs/metrics.md."""
    names = re.findall(r"^\|\s*`(dspark_[a-z0-9_]+)`\s*\|", DOC.read_text(), re.M)
    assert len(names) >= 20, "docs/metrics.md lost its tables?"
    return names


def exposed(text: str) -> tuple[dict[str, str], set[str]]:
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    return families, samples


def test_required_metric_names_are_documented():
    required = {
        "dspark_num_requests_running", "dspark_num_requests_waiting", "dspark_kv_cache_used_blocks",
        "dspark_kv_cache_total_blocks", "dspark_kv_cache_usage_ratio", "dspark_request_success_total",
        "dspark_request_errors_total", "dspark_prompt_tokens_total", "dspark_generation_tokens_total",
        "dspark_time_to_first_token_seconds", "dspark_inter_token_latency_seconds",
        "dspark_time_per_output_token_seconds", "dspark_e2e_request_latency_seconds",
        "dspark_request_prompt_tokens", "dspark_request_generation_tokens",
        "dspark_spec_decode_num_drafts_total", "dspark_spec_decode_num_proposed_tokens_total",
        "dspark_spec_decode_num_draft_tokens_total", "dspark_spec_decode_num_accepted_tokens_total",
        "dspark_spec_decode_num_accepted_tokens_per_pos_total", "dspark_spec_decode_verify_length",
        "dspark_engine_preemptions_total", "dspark_model_info", "dspark_prefix_cache_queries_total",
        "dspark_prefix_cache_hits_total", "dspark_kv_cache_cached_blocks",
    }
    assert required <= set(documented_metrics())


def test_metrics_parse_and_contain_every_documented_family(server):
    r = httpx.get(f"{server.url}/metrics")  # no API key needed
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    families, samples = exposed(r.text)
    missing = []
    for name in documented_metrics():
        # A counter family is named without `_total`; its samples carry it.
        base = name[: -len("_total")] if name.endswith("_total") else name
        if name not in families and name not in samples and families.get(base) != "counter":
            missing.append(name)
    assert not missing, f"documented but not exposed: {missing}"
    # ...and nothing dspark_ is exposed without documentation.
    doc = set(documented_metrics())
    undocumented = [f for f in families if f.startswith("dspark_") and f not in doc and f"{f}_total" not in doc]
    assert not undocumented, f"exposed but not documented: {undocumented}"


def test_metric_types(server):
    families, _ = exposed(httpx.get(f"{server.url}/metrics").text)
    assert families["dspark_time_to_first_token_seconds"] == "histogram"
    assert families["dspark_spec_decode_verify_length"] == "histogram"
    assert families["dspark_request_success"] == "counter"
    assert families["dspark_kv_cache_used_blocks"] == "gauge"
    assert families["dspark_model_info"] == "gauge"


def test_counters_follow_a_request(client):
    wait_until(lambda: server_idle(client), 30, what="an idle server")
    before = client.get("/metrics").text
    body = client.post("/v1/chat/completions", json=chat_body(max_tokens=5, ignore_eos=True)).json()
    after = client.get("/metrics").text

    def delta(name, labels=None):
        return metric_value(after, name, labels) - metric_value(before, name, labels)

    usage = body["usage"]
    assert delta("dspark_prompt_tokens_total") == usage["prompt_tokens"]
    assert delta("dspark_generation_tokens_total") == usage["completion_tokens"] == 5
    assert delta("dspark_request_success_total", {"finish_reason": "length"}) == 1
    assert delta("dspark_time_to_first_token_seconds_count") == 1
    assert delta("dspark_e2e_request_latency_seconds_count") == 1
    assert delta("dspark_time_per_output_token_seconds_count") == 1
    assert delta("dspark_inter_token_latency_seconds_count") == 4
    assert delta("dspark_request_prompt_tokens_sum") == usage["prompt_tokens"]
    assert delta("dspark_request_generation_tokens_sum") == 5
    assert metric_value(after, "dspark_kv_cache_total_blocks") > 0
    # the same conversation again: its full prompt blocks come from the prefix cache
    second = client.post("/v1/chat/completions", json=chat_body(max_tokens=2, ignore_eos=True)).json()
    again = client.get("/metrics").text
    hits = metric_value(again, "dspark_prefix_cache_hits_total") - metric_value(after, "dspark_prefix_cache_hits_total")
    block = 16
    assert hits == (usage["prompt_tokens"] - 1) // block * block > 0
    assert metric_value(again, "dspark_prefix_cache_queries_total") - metric_value(after, "dspark_prefix_cache_queries_total") == usage["prompt_tokens"]
    assert metric_value(again, "dspark_prompt_tokens_total") - metric_value(after, "dspark_prompt_tokens_total") == usage["prompt_tokens"]
    assert metric_value(again, "dspark_kv_cache_cached_blocks") >= hits // block
    assert second["usage"]["prompt_tokens_details"] == {"cached_tokens": hits}  # OpenAI's field
    info = [s for f in text_string_to_metric_families(after) if f.name == "dspark_model_info" for s in f.samples]
    assert info[0].labels["model"] == "SmolLM2-135M-Instruct" and info[0].labels["dtype"]


def test_errors_are_counted_by_status(server, client):
    before = client.get("/metrics").text
    client.post("/v1/chat/completions", json=chat_body(temperature=5))
    client.post("/v1/chat/completions", json=chat_body(model="nope"))
    httpx.get(f"{server.url}/v1/models")  # no key
    after = client.get("/metrics").text
    for code in ("400", "404", "401"):
        assert (metric_value(after, "dspark_request_errors_total", {"code": code})
                - metric_value(before, "dspark_request_errors_total", {"code": code})) == 1


def test_access_log_has_one_line_per_request(server, client):
    r = client.post("/v1/chat/completions", json=chat_body(max_tokens=3, ignore_eos=True, user="bob"))
    rid = r.headers["x-request-id"]
    assert r.json()["id"] == f"chatcmpl-{rid}"
    bad = client.post("/v1/chat/completions", json=chat_body(temperature=7))

    def line_for(request_id):
        # Written when the response is complete, which can be just after the client has it.
        matches = wait_until(lambda: [e for e in server.access_lines() if e["request_id"] == request_id], 5,
                             what=f"the access log line of {request_id}")
        assert len(matches) == 1
        return matches[0]

    entry = line_for(rid)
    assert entry["status"] == 200 and entry["path"] == "/v1/chat/completions"
    assert entry["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    assert entry["completion_tokens"] == 3
    assert entry["finish_reason"] == "length"
    assert entry["user"] == "bob"
    assert entry["latency_s"] > 0
    assert line_for(bad.headers["x-request-id"])["status"] == 400
