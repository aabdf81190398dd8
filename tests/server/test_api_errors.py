"""Every error has its status and the OpenAI body {"error": {message, type, param, code}}."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from server_helpers import chat_body, stream_events

CHAT = "/v1/chat/completions"


def assert_error(r: httpx.Response, status: int, param: str | None = "any", code: str | None = "any") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)
    if param != "any":
        assert err["param"] == param
    if code != "any":
        assert err["code"] == code
    return err


LONG_PROMPT = "hello " * 2100  # ~2100 tokens, over --max-model-len 2048


@pytest.mark.parametrize("body, status, param, code", [
    (chat_body(max_tokens="5"), 400, "max_tokens", "invalid_value"),
    (chat_body(max_tokens=-1), 400, "max_tokens", "invalid_value"),
    (chat_body(max_tokens=0), 400, "max_tokens", "invalid_value"),
    (chat_body(max_tokens=10**12), 400, "max_tokens", "invalid_value"),  # past MAX_TOKEN_COUNT
    (chat_body(max_tokens=10**6), 400, "max_tokens", "context_length_exceeded"),
    (chat_body(top_k=2**63 - 1), 400, "top_k", "invalid_value"),  # past the vocabulary (issue 28's live 500)
    (chat_body(stop_token_ids=[2**40]), 400, "stop_token_ids", "invalid_value"),
    (chat_body(tools=[{"type": "function", "function": {"name": "no spaces"}}]), 400, "tools.0.function.name",
     "invalid_value"),
    (chat_body(functions=[{"name": "f"}]), 400, "functions", "unsupported"),
    (chat_body(max_tokens=2040), 400, "max_tokens", "context_length_exceeded"),
    (chat_body(temperature=2.5), 400, "temperature", "invalid_value"),
    (chat_body(temperature=-0.1), 400, "temperature", "invalid_value"),
    (chat_body(temperature="hot"), 400, "temperature", "invalid_value"),
    (chat_body(top_p=0), 400, "top_p", "invalid_value"),
    (chat_body(n=0), 400, "n", "invalid_value"),
    (chat_body(n=100), 400, "n", "invalid_value"),
    (chat_body(stream="yes"), 400, "stream", "invalid_value"),
    (chat_body(stop=[1, 2]), 400, "stop", "invalid_value"),
    (chat_body(presence_penalty=3), 400, "presence_penalty", "invalid_value"),
    (chat_body(top_logprobs=2), 400, "top_logprobs", "invalid_value"),
    (chat_body(logprobs=True, top_logprobs=50), 400, "top_logprobs", "invalid_value"),
    (chat_body(min_tokens=10, max_tokens=5), 400, "min_tokens", "invalid_value"),
    ({"messages": []}, 400, "messages", "invalid_value"),
    ({"messages": "hi"}, 400, "messages", "invalid_value"),
    ({"max_tokens": 4}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages", "unsupported"),
    (chat_body(content=LONG_PROMPT), 400, "messages", "context_length_exceeded"),
    (chat_body(model="gpt-4o"), 404, "model", "model_not_found"),
])
def test_chat_rejects_bad_requests(client, body, status, param, code):
    assert_error(client.post(CHAT, json=body), status, param, code)


@pytest.mark.parametrize("body, status, param, code", [
    ({"prompt": LONG_PROMPT, "max_tokens": 4}, 400, "prompt", "context_length_exceeded"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt", "invalid_value"),
    ({"prompt": [], "max_tokens": 4}, 400, "prompt", "invalid_value"),
    ({"prompt": [1, 2, 10**9], "max_tokens": 4}, 400, "prompt", "invalid_value"),
    ({"prompt": [1, "a"], "max_tokens": 4}, 400, "prompt", "invalid_value"),
    ({"max_tokens": 4}, 400, "prompt", "invalid_value"),
    ({"prompt": "hi", "echo": True, "logprobs": 1}, 400, "echo", "unsupported"),
    ({"prompt": "hi", "model": "nope"}, 404, "model", "model_not_found"),
])
def test_completions_rejects_bad_requests(client, body, status, param, code):
    assert_error(client.post("/v1/completions", json=body), status, param, code)


def test_invalid_json_and_non_object_bodies(client):
    assert_error(client.post(CHAT, content=b'{"messages": [', headers={"content-type": "application/json"}),
                 400, None, "invalid_json")
    assert_error(client.post(CHAT, content=b"", headers={"content-type": "application/json"}), 400)
    assert_error(client.post(CHAT, json=[1, 2]), 400, None)


def test_unknown_route_and_wrong_method(client):
    assert_error(client.get("/v1/nothing-here"), 404, None, "not_found")
    r = client.get(CHAT)
    assert_error(r, 405, None, "method_not_allowed")
    assert r.headers["allow"] == "POST"
    assert_error(client.get("/v1/models/other-model"), 404, "model", "model_not_found")


def test_request_body_over_the_limit_is_413(client):
    big = b'{"prompt": "' + b"x" * (9 << 20) + b'"}'
    assert_error(client.post("/v1/completions", content=big, headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(9):
            yield b"x" * (1 << 20)

    assert_error(client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_api_key_is_required_except_on_probes(server, client):
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "test-key"},
                    {"Authorization": "Basic dGVzdC1rZXk="}):
        r = httpx.post(f"{server.url}{CHAT}", json=chat_body(), headers=headers)
        assert_error(r, 401, None, "invalid_api_key")
        assert_error(httpx.get(f"{server.url}/v1/models", headers=headers), 401)
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(f"{server.url}{path}").status_code == 200
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_openai_client_raises_typed_errors(oai, model_name):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "hi"}], temperature=3)
    assert e.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as e:
        oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=model_name, prompt=LONG_PROMPT, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


def test_bad_requests_do_not_disturb_a_running_one(server, client):
    """A seeded stream gives the same text alone and while bad requests hit the server."""
    kw = dict(content="Write one sentence about mountains.", temperature=1.0, seed=99, max_tokens=24)
    alone = client.post(CHAT, json=chat_body(**kw)).json()["choices"][0]["message"]["content"]

    result = {}

    def good():
        events = stream_events(client, CHAT, chat_body(**kw))
        result["text"] = "".join(c["choices"][0]["delta"].get("content") or ""
                                 for c in events[:-1] if c["choices"])

    t = threading.Thread(target=good)
    t.start()
    bad_bodies = [chat_body(temperature=9), {"messages": []}, chat_body(content=LONG_PROMPT),
                  chat_body(max_tokens=-3), chat_body(model="x"), chat_body(top_k=2**63 - 1),
                  chat_body(stop_token_ids=[10**9]), chat_body(min_tokens=2**62)]
    with httpx.Client(base_url=server.url, headers=client.headers, timeout=30) as other:
        while t.is_alive():
            for body in bad_bodies:
                assert other.post(CHAT, json=body).status_code >= 400
            assert other.post(CHAT, content=b"{nope", headers={"content-type": "application/json"}).status_code == 400
            assert other.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer bad"}).status_code == 401
    t.join(60)
    assert result["text"] == alone
