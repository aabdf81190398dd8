"""Fuzzing: schemathesis against the real server's /openapi.json, hypothesis on the protocol models.

The server runs with small request limits (4 output tokens, 2 choices, 128 prompt
tokens) so that the requests schemathesis generates, valid or not, are answered in
well under a second each. Every answer must be a non-5xx, and every error must be in
the OpenAI shape.
"""

from __future__ import annotations

import json

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from schemathesis.checks import not_a_server_error

from dspark_testing import serving
from dspark_serve.server import protocol as P
from dspark_serve.server.errors import from_validation_errors

EXAMPLES = 60  # per generation route and mode


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    with serving(["--max-model-len", "512", "--max-num-seqs", "8", "--kv-cache-memory", "64MiB",
                  "--max-output-tokens", "4", "--max-n", "2", "--max-prompt-tokens", "128"],
                 tmp_path_factory.mktemp("fuzz") / "server.log") as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


def errors_in_openai_shape(ctx, response, case) -> None:
    if response.status_code < 400:
        return
    body = json.loads(response.content)
    err = body.get("error") if isinstance(body, dict) else None
    assert isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}, response.text
    assert "Traceback" not in err["message"] and 'File "' not in err["message"], err["message"]


OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "GET /v1/models", "GET /v1/models/{model_id}",
              "GET /v1/dspark/calibration", "GET /health", "GET /version"]


# (schemathesis' own pytest plugin does not run under this pytest: its cases are drawn here.)
# Negative cases (bodies that break the schema) exist only where there is a body.
CASES = [(label, "positive") for label in OPERATIONS] + [(label, "negative") for label in OPERATIONS[:2]]


@pytest.mark.parametrize("label,mode", CASES)
def test_api_never_answers_5xx_and_errors_are_openai_shaped(api_schema, fuzz_server, label, mode):
    ops = {op.label: op for op in (r.ok() for r in api_schema.get_all_operations())}
    assert set(OPERATIONS) <= set(ops), sorted(ops)
    gen_mode = schemathesis.GenerationMode.POSITIVE if mode == "positive" else schemathesis.GenerationMode.NEGATIVE
    examples = EXAMPLES if label.startswith("POST") else 5

    @given(case=ops[label].as_strategy(generation_mode=gen_mode))
    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def run(case):
        response = case.call(base_url=fuzz_server.url, timeout=60)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        case.validate_response(response, checks=[not_a_server_error, errors_in_openai_shape])

    statuses: dict[int, int] = {}
    run()
    print(label, mode, statuses)
    if mode == "positive" and label.startswith("POST"):
        assert statuses.get(200, 0) > 0, statuses  # valid bodies reach generation, not only the 400 paths


def test_openapi_documents_the_generation_bodies(fuzz_server):
    import httpx

    doc = httpx.get(f"{fuzz_server.url}/openapi.json").json()
    for path, model in (("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")):
        op = doc["paths"][path]["post"]
        assert op["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(model)
        assert {"400", "429", "503"} <= set(op["responses"])
    assert "messages" in doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]


# ---------------------------------------------------------------- the protocol models

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs", "presence_penalty",
          "frequency_penalty", "repetition_penalty", "stop_token_ids", "ignore_eos", "min_tokens", "echo"]
bodies = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)


@given(body=bodies, which=st.sampled_from([P.ChatCompletionRequest, P.CompletionRequest]))
@settings(max_examples=300, deadline=None, derandomize=True)
def test_any_json_body_parses_or_maps_to_a_clean_400(body, which):
    raw = json.dumps(body, allow_nan=True)
    try:
        req = which.model_validate_json(raw)
    except ValidationError as e:
        err = from_validation_errors(e.errors(include_url=False))
        assert err.status == 400 and err.message
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
        assert err.param is None or err.param in FIELDS or err.param in body
        return
    # Accepted: every limit the model promises holds.
    assert 1 <= req.n <= P.MAX_N
    assert req.temperature is None or 0 <= req.temperature <= 2
    assert req.max_tokens is None or req.max_tokens >= 1


messages = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant", "developer"]),
    "content": st.text(max_size=40)}), min_size=1, max_size=4)


@given(msgs=messages, n=st.integers(1, P.MAX_N), temperature=st.floats(0, 2), max_tokens=st.integers(1, 10**6),
       seed=st.none() | st.integers(-(2**63), P.MAX_SEED - P.MAX_N), stop=st.none() | st.text(max_size=5),
       stream=st.booleans())
@settings(max_examples=200, deadline=None, derandomize=True)
def test_valid_chat_requests_round_trip(msgs, n, temperature, max_tokens, seed, stop, stream):
    body = {"messages": msgs, "n": n, "temperature": temperature, "max_tokens": max_tokens, "seed": seed,
            "stop": stop, "stream": stream}
    req = P.ChatCompletionRequest.model_validate_json(json.dumps(body))
    assert [(m.role, m.content) for m in req.messages] == [(m["role"], m["content"]) for m in msgs]
    assert (req.n, req.temperature, req.max_tokens, req.seed, req.stop, req.stream) == (
        n, temperature, max_tokens, seed, stop, stream)
    assert req.output_limit == max_tokens


# ---------------------------------------------------------------- extreme values beside running requests

EXTREME_INTS = [0, -1, 1, 2**31 - 1, 2**31, 2**63 - 1, -(2**63), 2**64]
# JSON's NaN/Infinity literals (json.dumps writes them), the strings, and a literal that overflows a double.
EXTREME_FLOATS = [1e308, -1e308, 1e-308, -0.0, float("nan"), float("inf"), float("-inf"), "NaN", "Infinity",
                  "RAW:1e999"]
CHAT_INT_FIELDS = ["max_tokens", "max_completion_tokens", "min_tokens", "top_k", "seed", "n", "top_logprobs",
                   "max_draft_tokens", "best_of"]
COMPLETION_INT_FIELDS = ["max_tokens", "logprobs", "top_k", "min_tokens"]
FLOAT_FIELDS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
HI = [{"role": "user", "content": "hi"}]


def extreme_requests() -> list[tuple[str, str, dict]]:
    """(path, label, body): each field at each extreme value, then the long lists and strings."""
    chat, cmpl = "/v1/chat/completions", "/v1/completions"
    cases = []
    for v in EXTREME_INTS:
        for f in CHAT_INT_FIELDS:
            extra = {"logprobs": True} if f == "top_logprobs" else {}
            cases.append((chat, f, {"messages": HI, f: v, **extra}))
        for f in COMPLETION_INT_FIELDS:
            cases.append((cmpl, f, {"prompt": "hi", f: v}))
        cases.append((chat, "stop_token_ids", {"messages": HI, "stop_token_ids": [v]}))
        cases.append((cmpl, "prompt", {"prompt": [v]}))
    for v in EXTREME_FLOATS:
        for f in FLOAT_FIELDS:
            cases.append((chat, f, {"messages": HI, f: v}))
    long_cases = {
        "stop_token_ids": list(range(10_000)),
        "stop": ["x"] * 1000,
        "messages": HI * 5000,
        "user": "u" * 100_000,
        "model": "m" * 100_000,
        "logit_bias": {str(i): 100 for i in range(1000)},
        "tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(1000)],
    }
    for f, v in long_cases.items():
        cases.append((chat, f, {"messages": HI, f: v}))
    cases.append((chat, "stop", {"messages": HI, "stop": ["y" * 100_000]}))
    parts = [{"type": "text", "text": "a"}] * 5000
    cases.append((chat, "messages", {"messages": [{"role": "user", "content": parts}]}))
    for prompt in (list(range(100_000)), [[1] * 10] * 1000, [[]], [1] * 127, ["hi"] * 1000):
        cases.append((cmpl, "prompt", {"prompt": prompt}))
    return cases


def _encode(body: dict) -> bytes:
    text = json.dumps(body, allow_nan=True)  # NaN / Infinity / -Infinity as JSON literals
    return text.replace('"RAW:1e999"', "1e999").encode()


def test_extreme_values_never_fail_the_requests_running_beside_them(fuzz_server):
    """Issue 28: one request's field value (top_k 2**63 - 1) failed the engine step and every request in it.

    Normal greedy requests (4 at a time, half streamed) run throughout while every field is sent at
    extreme values and with long lists: no fuzz request may get a 5xx, no normal request may fail.
    """
    import threading
    import time
    from collections import Counter
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    stop = threading.Event()
    normal_done, normal_failures = Counter(), []

    def normal(worker: int) -> None:
        body = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0, "max_tokens": 4}
        with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if i % 2:
                        r = c.post("/v1/chat/completions", json=body)
                        ok = r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
                        detail = r.text
                    else:
                        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                            lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                        events = [json.loads(ln[6:]) for ln in lines[:-1]]
                        ok = (r.status_code == 200 and lines[-1] == "data: [DONE]"
                              and not any("error" in e for e in events)
                              and any(ch.get("finish_reason") in ("stop", "length")
                                      for e in events for ch in e.get("choices", [])))
                        detail = "\n".join(lines[-3:])
                except httpx.HTTPError as e:
                    ok, detail = False, repr(e)
                if ok:
                    normal_done[worker] += 1
                else:
                    normal_failures.append(detail[:500])

    cases = extreme_requests()
    statuses: Counter = Counter()
    server_errors = []

    def fuzz(case) -> None:
        path, label, body = case
        with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
            r = c.post(path, content=_encode(body), headers={"content-type": "application/json"})
        statuses[r.status_code] += 1
        if r.status_code >= 500:
            server_errors.append((label, str(body)[:120], r.text[:300]))
        elif r.status_code >= 400:
            err = r.json()["error"]
            assert set(err) == {"message", "type", "param", "code"}, r.text
            assert len(err["message"]) < 1000, err  # a long field value is not quoted back

    t0 = time.monotonic()
    workers = [threading.Thread(target=normal, args=(w,), daemon=True) for w in range(4)]
    for w in workers:
        w.start()
    try:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(fuzz, cases))
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    elapsed = time.monotonic() - t0
    print(f"extreme-value fuzz: {len(cases)} requests, statuses {dict(sorted(statuses.items()))}; "
          f"{sum(normal_done.values())} normal requests completed beside them, {len(normal_failures)} failed; "
          f"{elapsed:.1f} s")
    assert not server_errors and not normal_failures, (server_errors, normal_failures[:3])
    assert sum(normal_done.values()) >= 8
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
