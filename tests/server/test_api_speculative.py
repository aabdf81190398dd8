"""A server with DSpark speculation on: same greedy answers, real speculation metrics, per-request cap."""

from __future__ import annotations

import httpx
import pytest

from dspark_testing import make_random_drafter
from server_helpers import ServerProcess, chat_body, metric_value, wait_until


@pytest.fixture(scope="module")
def rounds_log(tmp_path_factory):
    return tmp_path_factory.mktemp("rounds") / "rounds.jsonl"


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory, rounds_log):
    from dspark_serve.models.loader import load_model

    drafter = make_random_drafter(load_model(None, dtype="float32").model, tmp_path_factory.mktemp("drafter"), block_size=4)
    log = tmp_path_factory.mktemp("spec-server") / "server.log"
    srv = ServerProcess(
        ["--max-model-len", "1024", "--max-num-seqs", "8", "--kv-cache-memory", "128MiB", "--dtype", "float32",
         "--record-acceptance", str(rounds_log), "--cost-table", str(tmp_path_factory.mktemp("ct") / "table.json"),
         "--speculative-config", f'{{"method": "dspark", "model": "{drafter}", "num_speculative_tokens": 4}}'],
        log,
    )
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def _spec_counters(c: httpx.Client) -> dict:
    text = c.get("/metrics").text
    return {
        "drafts": metric_value(text, "dspark_spec_decode_num_drafts_total"),
        "draft_tokens": metric_value(text, "dspark_spec_decode_num_draft_tokens_total"),
        "proposed": metric_value(text, "dspark_spec_decode_num_proposed_tokens_total"),
        "accepted": metric_value(text, "dspark_spec_decode_num_accepted_tokens_total"),
    }


def test_speculation_runs_and_is_counted(spec_server):
    with httpx.Client(base_url=spec_server.url, timeout=120) as c:
        info = c.get("/metrics").text
        assert 'speculative_method="dspark"' in info
        before = _spec_counters(c)
        body = chat_body("Count from one to ten.", max_tokens=24, temperature=0, ignore_eos=True)
        r = c.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        after = _spec_counters(c)
        assert after["drafts"] > before["drafts"]
        assert after["draft_tokens"] - before["draft_tokens"] <= 4 * (after["drafts"] - before["drafts"])
        assert after["proposed"] >= after["draft_tokens"]
        assert r.json()["usage"]["completion_tokens"] == 24
        # the request-level cap: 0 means no drafts for it
        mid = _spec_counters(c)
        r = c.post("/v1/chat/completions", json={**body, "max_draft_tokens": 0})
        assert r.status_code == 200
        assert _spec_counters(c)["drafts"] == mid["drafts"]
        bad = c.post("/v1/chat/completions", json={**body, "max_draft_tokens": "many"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_draft_tokens"


def _floor_outcomes(c: httpx.Client) -> float:
    text = c.get("/metrics").text
    return sum(metric_value(text, "dspark_sla_requests_total", {"outcome": o}) for o in ("met", "missed"))


def test_a_request_with_a_speed_floor(spec_server):
    with httpx.Client(base_url=spec_server.url, timeout=120) as c:
        body = chat_body("Count from one to ten.", max_tokens=12, temperature=0, ignore_eos=True)
        plain = c.post("/v1/chat/completions", json=body)
        before = _floor_outcomes(c)
        floored = c.post("/v1/chat/completions", json={**body, "min_tokens_per_s": 1.0, "priority": -1})
        assert floored.status_code == 200, floored.text
        # greedy: the floor changes what is verified, never the answer
        assert floored.json()["choices"][0]["message"] == plain.json()["choices"][0]["message"]
        wait_until(lambda: _floor_outcomes(c) == before + 1, 10, what="the floor's outcome counted")
        assert metric_value(c.get("/metrics").text, "dspark_sla_default_floor_tokens_per_s") == 0.0
        bad = c.post("/v1/chat/completions", json={**body, "min_tokens_per_s": -3})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "min_tokens_per_s"


def test_calibration_report_and_offline_fit(spec_server, rounds_log, tmp_path):
    import json
    import subprocess
    import sys

    with httpx.Client(base_url=spec_server.url, timeout=120) as c:
        c.post("/v1/chat/completions", json=chat_body("Name some colours.", max_tokens=16, temperature=1.0, seed=1))
        r = c.get("/v1/dspark/calibration")
        assert r.status_code == 200
        report = r.json()
        assert report["gamma"] == 4 and set(report["online"]) == {"greedy", "sampled"}
        assert len(report["online"]["sampled"]["temperatures"]) == 4
        text = c.get("/metrics").text
        assert "dspark_spec_decode_cost_table_sps" in text and metric_value(text, "dspark_spec_decode_cost_table_sps") > 0
    rounds = [json.loads(line) for line in rounds_log.read_text().splitlines()]
    drafted = [x for x in rounds if not x.get("lookup")]  # context lookup's rounds carry no drafter logits
    assert drafted and all(x["verified"] <= len(x["logits"]) <= 4 for x in drafted)
    assert all(0 <= x["accepted"] <= x["verified"] for x in rounds)
    log = tmp_path / "rounds.jsonl"  # the fit skips lookup rounds (one is added in case the server logged none)
    log.write_text(rounds_log.read_text() + json.dumps({"lookup": 3, "verified": 4, "accepted": 4}) + "\n")
    out = tmp_path / "calibration.json"
    res = subprocess.run([sys.executable, "-m", "dspark_serve.server.cli", "calibrate", str(log), "--output", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert len(json.loads(out.read_text())["temperatures"]) == 4


def test_the_default_server_speculates_with_the_embedded_drafter(client):
    """No --speculative-config: the embedded model is served with its embedded, calibrated drafter."""
    r = client.get("/v1/dspark/calibration")
    assert r.status_code == 200
    body = r.json()
    assert body["gamma"] == 7 and body["file"] is not None  # calibration.json beside the drafter
    assert 'speculative_method="dspark"' in client.get("/metrics").text
