"""Every numeric and list field of a generation request has a bound, checked at the API (issue 28).

One case per bound: the value past it is a 400 in the OpenAI shape naming the field, the value at it
is accepted. In-process around the fake engine (vocabulary 1000, context 256): these are the server's
own checks, and a value that gets through would reach the engine's step, shared with every running
request (the live finding: `top_k: 2**63 - 1` failed four streams beside it).
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from dspark_serve.server import protocol as P
from dspark_serve.server.app import ServerSettings, create_app
from fake_engine import FakeEngine, FakeTokenizer

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "hi"}]
VOCAB, CONTEXT = FakeEngine.vocab_size, FakeEngine.max_model_len
CHAT_PROMPT_TOKENS = len(FakeTokenizer().encode("<user>hi<assistant>"))


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServerSettings())) as c:
        yield c


def post(client, path: str, **fields):
    base = {"messages": HI} if path == CHAT else {"prompt": "hi"}
    return client.post(path, json={**base, **fields})


def _id(path: str, fields: dict) -> str:
    return path.rsplit("/", 1)[1] + "-" + ",".join(f"{k}={v!r:.24}" for k, v in fields.items())


def bad(path, param, value, code="invalid_value", **other):
    fields = {param: value, **other}
    return pytest.param(path, fields, param, code, id=_id(path, fields))


def ok(path, **fields):
    return pytest.param(path, fields, id=_id(path, fields))


OVER_THE_BOUND = [
    # top_k: -1 and 0 disable it; above the vocabulary is refused (the live 500).
    bad(CHAT, "top_k", VOCAB + 1),
    bad(CHAT, "top_k", 2**63 - 1),
    bad(CHAT, "top_k", 2**64),
    bad(CHAT, "top_k", -2),
    bad(COMPLETIONS, "top_k", 2**63 - 1),
    # stop_token_ids: ids in [0, vocab), at most MAX_STOP_TOKEN_IDS of them
    bad(CHAT, "stop_token_ids", [VOCAB]),
    bad(CHAT, "stop_token_ids", [-1]),
    bad(CHAT, "stop_token_ids", [2**63]),
    bad(CHAT, "stop_token_ids", list(range(P.MAX_STOP_TOKEN_IDS + 1))),
    bad(COMPLETIONS, "stop_token_ids", [VOCAB]),
    # stop: at most MAX_STOP_STRINGS strings of at most MAX_STOP_STRING_CHARS characters
    bad(CHAT, "stop", ["x"] * (P.MAX_STOP_STRINGS + 1)),
    bad(CHAT, "stop", ["x" * (P.MAX_STOP_STRING_CHARS + 1)]),
    bad(CHAT, "stop", "x" * (P.MAX_STOP_STRING_CHARS + 1)),
    bad(COMPLETIONS, "stop", ["x"] * 1000),
    # seed: seed + k (choice k) stays a 64-bit integer
    bad(CHAT, "seed", P.MAX_SEED - P.MAX_N + 1),
    bad(CHAT, "seed", -(2**63) - 1),
    bad(CHAT, "seed", 2**64),
    # floats: ranges, and no NaN/inf in any spelling
    bad(CHAT, "temperature", 2.0001),
    bad(CHAT, "temperature", -0.1),
    bad(CHAT, "temperature", "NaN"),
    bad(CHAT, "temperature", 1e308),
    bad(CHAT, "top_p", 0.0),
    bad(CHAT, "top_p", 1.0001),
    bad(CHAT, "min_p", -0.1),
    bad(CHAT, "min_p", 1.1),
    bad(CHAT, "presence_penalty", 2.01),
    bad(CHAT, "presence_penalty", -2.01),
    bad(CHAT, "frequency_penalty", 2.01),
    bad(CHAT, "frequency_penalty", -1e308),
    bad(CHAT, "repetition_penalty", 0.0),
    bad(CHAT, "repetition_penalty", 10.01),
    # token counts: at most MAX_TOKEN_COUNT as a field, then the context length
    bad(CHAT, "max_tokens", 0),
    bad(CHAT, "max_tokens", -(2**63)),
    bad(CHAT, "max_tokens", P.MAX_TOKEN_COUNT + 1),
    bad(CHAT, "max_tokens", 2**63),
    bad(CHAT, "max_tokens", CONTEXT - CHAT_PROMPT_TOKENS + 1, "context_length_exceeded"),
    bad(CHAT, "max_completion_tokens", 0),
    bad(CHAT, "max_completion_tokens", 2**63 - 1),
    bad(COMPLETIONS, "max_tokens", 2**63 - 1),
    bad(CHAT, "min_tokens", -1),
    bad(CHAT, "min_tokens", CONTEXT + 1),
    bad(CHAT, "min_tokens", 2**63),
    bad(CHAT, "min_tokens", 10, max_tokens=5),
    # logprobs
    bad(CHAT, "top_logprobs", P.MAX_TOP_LOGPROBS + 1, logprobs=True),
    bad(CHAT, "top_logprobs", -1, logprobs=True),
    bad(COMPLETIONS, "logprobs", P.MAX_TOP_LOGPROBS + 1),
    bad(COMPLETIONS, "logprobs", 2**63),
    # speculation cap and choices
    bad(CHAT, "max_draft_tokens", P.MAX_DRAFT_TOKENS + 1),
    bad(CHAT, "max_draft_tokens", -1),
    bad(CHAT, "min_tokens_per_s", -1),
    bad(CHAT, "min_tokens_per_s", 1e9),
    bad(CHAT, "min_tokens_per_s", "fast"),
    bad(COMPLETIONS, "min_tokens_per_s", -0.5),
    bad(CHAT, "priority", 2**31),
    bad(CHAT, "priority", 1.5),
    bad(CHAT, "n", 0),
    bad(CHAT, "n", P.MAX_N + 1),
    bad(CHAT, "n", 2**63),
    # lists and strings
    bad(CHAT, "messages", []),
    bad(CHAT, "messages", HI * (P.MAX_MESSAGES + 1)),
    bad(CHAT, "messages", [{"role": "user", "content": [{"type": "text", "text": "a"}] * (P.MAX_CONTENT_PARTS + 1)}]),
    bad(CHAT, "messages", [{"role": "user", "content": "hi", "name": "n" * (P.MAX_ID_CHARS + 1)}]),
    bad(CHAT, "user", "u" * (P.MAX_ID_CHARS + 1)),
    bad(CHAT, "model", "m" * (P.MAX_MODEL_CHARS + 1)),
    # prompt token ids: in the vocabulary, no longer than the context, at most MAX_PROMPTS prompts
    bad(COMPLETIONS, "prompt", [VOCAB]),
    bad(COMPLETIONS, "prompt", [-1]),
    bad(COMPLETIONS, "prompt", [2**63]),
    bad(COMPLETIONS, "prompt", [[1], [2**64]]),
    bad(COMPLETIONS, "prompt", list(range(CONTEXT)), "context_length_exceeded"),
    bad(COMPLETIONS, "prompt", [1] * 100_000, "context_length_exceeded"),
    bad(COMPLETIONS, "prompt", [[1]] * (P.MAX_PROMPTS + 1)),
    bad(COMPLETIONS, "prompt", ["a"] * (P.MAX_PROMPTS + 1)),
]

AT_THE_BOUND = [
    ok(CHAT, top_k=VOCAB), ok(CHAT, top_k=-1), ok(CHAT, top_k=0), ok(CHAT, top_k=1),
    ok(CHAT, stop_token_ids=[0, VOCAB - 1]), ok(CHAT, stop_token_ids=list(range(P.MAX_STOP_TOKEN_IDS))),
    ok(CHAT, stop=["x"] * P.MAX_STOP_STRINGS), ok(CHAT, stop="x" * P.MAX_STOP_STRING_CHARS),
    ok(CHAT, seed=P.MAX_SEED - P.MAX_N, n=P.MAX_N), ok(CHAT, seed=-(2**63)),
    ok(CHAT, temperature=2.0), ok(CHAT, top_p=1.0), ok(CHAT, min_p=1.0),
    ok(CHAT, presence_penalty=-2.0, frequency_penalty=2.0), ok(CHAT, repetition_penalty=10.0),
    ok(CHAT, max_tokens=CONTEXT - CHAT_PROMPT_TOKENS), ok(CHAT, max_completion_tokens=CONTEXT - CHAT_PROMPT_TOKENS),
    ok(CHAT, min_tokens=CONTEXT), ok(CHAT, min_tokens=5, max_tokens=5),
    ok(CHAT, logprobs=True, top_logprobs=P.MAX_TOP_LOGPROBS), ok(COMPLETIONS, logprobs=P.MAX_TOP_LOGPROBS),
    ok(CHAT, max_draft_tokens=P.MAX_DRAFT_TOKENS), ok(CHAT, max_draft_tokens=0),
    ok(CHAT, messages=[{"role": "user", "content": [{"type": "text", "text": ""}] * P.MAX_CONTENT_PARTS}]),
    ok(CHAT, messages=[{"role": "user", "content": "hi", "name": "n" * P.MAX_ID_CHARS}]),
    ok(CHAT, user="u" * P.MAX_ID_CHARS),
    ok(COMPLETIONS, prompt=[0, VOCAB - 1]), ok(COMPLETIONS, prompt=list(range(CONTEXT - 1))),
    ok(COMPLETIONS, prompt=[[1]] * P.MAX_PROMPTS, max_tokens=1),
]


def assert_400(r, param: str, code: str) -> dict:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error"), err
    return err


@pytest.mark.parametrize("path, fields, param, code", OVER_THE_BOUND)
def test_a_value_past_its_bound_is_a_400_naming_the_field(client, engine, path, fields, param, code):
    err = assert_400(post(client, path, **fields), param, code)
    assert len(err["message"]) < 300  # says what is wrong without quoting the value back
    assert engine.calls == []  # refused before the engine saw it


@pytest.mark.parametrize("path, fields", AT_THE_BOUND)
def test_a_value_at_its_bound_is_accepted(client, engine, path, fields):
    r = post(client, path, **fields)
    assert r.status_code == 200, r.text
    assert engine.calls


def test_the_longest_message_list_passes_the_count_check():
    # (4096 messages do not fit the fake engine's context, so this is the protocol model's check alone.)
    P.ChatCompletionRequest.model_validate({"messages": HI * P.MAX_MESSAGES})


def test_huge_max_tokens_never_reaches_the_engine_as_an_overflow(client, engine):
    # A server --max-output-tokens, or the context, answers before any tensor is built.
    for value in (P.MAX_TOKEN_COUNT, 10**6):
        assert_400(post(client, CHAT, max_tokens=value), "max_tokens", "context_length_exceeded")
    assert engine.calls == []


# ---------------------------------------------------------------- fields not implemented


@pytest.mark.parametrize("path, field, value", [
    (CHAT, "functions", [{"name": "f"}]),  # the deprecated form of tools
    (CHAT, "function_call", "auto"),
    (CHAT, "logit_bias", {"50": 100}),
    (COMPLETIONS, "logit_bias", {"50": -100}),
    (COMPLETIONS, "suffix", "the end"),
    (COMPLETIONS, "best_of", 2),
    (CHAT, "use_beam_search", True),
    (COMPLETIONS, "prompt_logprobs", 1),
])
def test_an_unimplemented_field_is_a_400_not_silently_ignored(client, engine, path, field, value):
    err = assert_400(post(client, path, **{field: value}), field, "unsupported")
    assert field in err["message"]
    assert engine.calls == []


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "required"}, "tool_choice"),  # no tools to choose from
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools.1.function.name"),  # twice
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(P.MAX_TOOLS + 1)]}, "tools"),
    ({"response_format": "text"}, "response_format"),  # an object, not a string
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"structured_outputs": {"json": {}, "regex": "a"}}, "structured_outputs.regex"),  # one constraint at most
    ({"guided_regex": "a" * 70_000}, "guided_regex"),  # past the 64 KiB bound on a grammar's source
])
def test_bad_tools_and_constraints_are_400_before_the_engine(client, engine, fields, param):
    r = post(client, CHAT, **fields)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert engine.calls == []


@pytest.mark.parametrize("path, fields", [
    (CHAT, {"tools": [], "tool_choice": "none"}),
    (CHAT, {"tools": None, "tool_choice": None, "functions": None, "function_call": None}),
    (CHAT, {"response_format": {"type": "text"}, "logit_bias": {}}),
    (COMPLETIONS, {"suffix": None, "best_of": 1, "logit_bias": None}),
    (COMPLETIONS, {"suffix": "", "use_beam_search": False}),
    # harmless unknown fields stay accepted
    (CHAT, {"metadata": {"k": "v"}, "store": False, "parallel_tool_calls": True, "service_tier": "auto"}),
])
def test_unimplemented_fields_at_their_neutral_value_are_accepted(client, path, fields):
    r = post(client, path, **fields)
    assert r.status_code == 200, r.text


# ---------------------------------------------------------------- no third-party text in errors


class RefusingTokenizer(FakeTokenizer):
    def apply_chat_template(self, messages, **kw):
        raise RuntimeError('jinja2.exceptions.TemplateError: File "/opt/secret/template.jinja", line 3')


def test_a_chat_template_failure_is_a_fixed_message(engine, caplog):
    engine.tokenizer = RefusingTokenizer()
    with TestClient(create_app(engine, ServerSettings())) as client, caplog.at_level("WARNING"):
        err = assert_400(post(client, CHAT), "messages", "invalid_value")
    assert "secret" not in err["message"] and "jinja" not in err["message"] and "File" not in err["message"]
    assert "/opt/secret/template.jinja" in caplog.text  # the operator still gets the reason


def test_a_dead_engine_is_a_503_without_its_reason(engine):
    from dspark_serve.engine import EngineDeadError

    engine.fail_with = EngineDeadError('CUDA error: an illegal memory access in File "/src/engine/x.py"')
    with TestClient(create_app(engine, ServerSettings())) as client:
        r = post(client, CHAT)
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "engine_unavailable" and "CUDA" not in err["message"] and "/src" not in err["message"]


# ---------------------------------------------------------------- the engine's own guard (offline API too)


@pytest.mark.parametrize("kw, param", [
    (dict(top_k=2**63 - 1), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(max_tokens=2**31), "max_tokens"), (dict(min_tokens=2**40), "min_tokens"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(stop_token_ids=[2**63]), "stop_token_ids"),
    (dict(stop_token_ids=["1"]), "stop_token_ids"), (dict(seed=1.5), "seed"),
    (dict(temperature=float("nan")), "temperature"), (dict(temperature=float("inf")), "temperature"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
])
def test_sampling_params_refuse_integers_a_step_cannot_hold(kw, param):
    from dspark_serve.engine import SamplingParams, SamplingParamsError

    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kw)
    assert e.value.param == param


def test_sampling_params_accept_the_bounds_and_numpy_integers():
    import numpy as np

    from dspark_serve.engine import SamplingParams
    from dspark_serve.engine.sampling_params import MAX_INT_PARAM

    p = SamplingParams(top_k=MAX_INT_PARAM, max_tokens=MAX_INT_PARAM, min_tokens=MAX_INT_PARAM,
                       stop_token_ids=[0, MAX_INT_PARAM], seed=np.int64(-(2**63)))
    assert p.top_k == MAX_INT_PARAM and SamplingParams(top_k=-1).top_k == 0
