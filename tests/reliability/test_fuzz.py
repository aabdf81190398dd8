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
from server import protocol as P
from server.errors import from_validation_errors

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
