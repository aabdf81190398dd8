"""create_app() in-process around a fake engine: what reaches the engine, and error mapping.

No model, no subprocess: these check the server's own logic in milliseconds.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from dspark_serve.engine import EngineDeadError, QueueFullError, RequestError
from dspark_serve.server.app import ServerSettings, create_app
from fake_engine import FakeEngine, FakeTokenizer
from server_helpers import sse_events


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServerSettings(max_request_body_size=4096))) as c:
        yield c


def chat(client, **kw):
    return client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **kw})


def test_two_apps_in_one_process_have_their_own_metrics():
    a, b = TestClient(create_app(FakeEngine())), TestClient(create_app(FakeEngine()))
    assert chat(a).status_code == 200
    for c, expected in ((a, 1.0), (b, 0.0)):
        samples = {s.name: s.value for f in text_string_to_metric_families(c.get("/metrics").text)
                   for s in f.samples}
        assert samples["dspark_e2e_request_latency_seconds_count"] == expected


def test_spec_decode_counters_are_exposed_from_engine_stats(client):
    families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").text)}
    per_pos = {s.labels["position"]: s.value for s in families["dspark_spec_decode_num_accepted_tokens_per_pos"].samples}
    assert per_pos == {"1": 1.0, "2": 2.0}
    hist = {s.name + s.labels.get("le", ""): s.value for s in families["dspark_spec_decode_verify_length"].samples}
    assert hist["dspark_spec_decode_verify_length_bucket0.0"] == 3
    assert hist["dspark_spec_decode_verify_length_bucket2.0"] == 4
    assert hist["dspark_spec_decode_verify_length_count"] == 4
    assert hist["dspark_spec_decode_verify_length_sum"] == 2


def test_without_max_tokens_the_engine_runs_to_the_context_limit(client, engine):
    assert chat(client).status_code == 200
    assert engine.calls[-1][1].max_tokens is None
    assert chat(client, max_tokens=5, max_completion_tokens=7).status_code == 200
    assert engine.calls[-1][1].max_tokens == 7


def test_sampling_fields_reach_the_engine(client, engine):
    r = chat(client, temperature=0.5, top_p=0.8, top_k=-1, min_p=0.1, stop="x", presence_penalty=0.2,
             frequency_penalty=-0.2, repetition_penalty=1.3, ignore_eos=True, min_tokens=1, seed=4,
             logprobs=True, top_logprobs=2)
    assert r.status_code == 200, r.text
    p = engine.calls[-1][1]
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.stop) == (0.5, 0.8, 0, 0.1, ["x"])
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.2, -0.2, 1.3)
    assert (p.ignore_eos, p.min_tokens, p.seed, p.logprobs, p.n) == (True, 1, 4, 2, 1)
    assert engine.calls[-1][2] == FakeTokenizer().encode("<user>hi<assistant>")


def test_n_choices_are_n_engine_requests_with_seeds_seed_plus_k(client, engine):
    body = chat(client, n=3, seed=10).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [call[1].seed for call in engine.calls] == [10, 11, 12]
    assert len({call[0] for call in engine.calls}) == 3
    assert body["usage"]["completion_tokens"] == 9


def test_stream_shape_with_n(client):
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "n": 2, "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    text = {}
    for e in events[:-1]:
        for c in e["choices"]:
            text[c["index"]] = text.get(c["index"], "") + (c["delta"].get("content") or "")
    assert text == {0: "Hello!", 1: "Hello!"}


def test_engine_refusals_map_to_statuses(client, engine):
    engine.fail_with = QueueFullError("full")
    r = chat(client)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full"
    engine.fail_with = RequestError("too long", "messages", "context_length_exceeded")
    r = client.post("/v1/completions", json={"prompt": "abc"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["code"] == "context_length_exceeded"
    engine.fail_with = EngineDeadError("gone")
    assert chat(client).status_code == 503


def test_engine_failure_mid_request_is_a_500_or_an_error_event(client, engine):
    engine.finish_reason = "error"
    r = chat(client)
    assert r.status_code == 500
    assert "boom" in r.json()["error"]["message"]
    with client.stream("POST", "/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as r:
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and events[-2]["error"]["type"] == "server_error"


def test_body_limit_and_open_routes(client):
    r = client.post("/v1/completions", content=b'{"prompt": "' + b"x" * 5000 + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    assert client.get("/health").json() == {"status": "ok"}


def test_api_key_comparison():
    c = TestClient(create_app(FakeEngine(), ServerSettings(api_key="s3cret")))
    assert chat(c).status_code == 401
    assert c.post("/v1/chat/completions", headers={"Authorization": "Bearer s3cret"},
                  json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert c.post("/v1/chat/completions", headers={"Authorization": "bearer s3cret"},
                  json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert c.get("/metrics").status_code == 200


def test_draining_refuses_new_work_with_503(engine):
    app = create_app(engine, ServerSettings(shutdown_grace_period=7))
    with TestClient(app) as c:
        app.state.lifecycle.draining = True
        r = chat(c)
        assert r.status_code == 503 and r.headers["retry-after"] == "7"
        assert c.get("/health").status_code == 503


def test_calibration_endpoint_without_speculation_is_a_404(client):
    r = client.get("/v1/dspark/calibration")
    assert r.status_code == 404 and r.json()["error"]["code"] == "speculation_off"
