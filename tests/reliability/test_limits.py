"""Request limits and security settings, checked in-process around the fake engine (milliseconds).

The same settings against the real server (flags, environment, YAML) go through
`server_settings_from_args`, checked at the bottom.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from fake_engine import FakeEngine
from dspark_serve.server.app import ServerSettings, create_app

CHAT = "/v1/chat/completions"


def app_client(engine=None, **settings) -> tuple[TestClient, FakeEngine]:
    engine = engine or FakeEngine()
    return TestClient(create_app(engine, ServerSettings(**settings))), engine


def chat(client, content="hi", **kw):
    return client.post(CHAT, json={"messages": [{"role": "user", "content": content}], **kw})


def assert_openai_error(r, status: int, code: str, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code
    if param is not None:
        assert err["param"] == param
    return err


def test_max_prompt_tokens():
    client, engine = app_client(max_prompt_tokens=30)
    # FakeTokenizer: one token per character of "<user>...<assistant>" (17 + content)
    assert chat(client, "x" * 13).status_code == 200
    assert_openai_error(chat(client, "x" * 14), 400, "prompt_too_long", "messages")
    r = client.post("/v1/completions", json={"prompt": "y" * 31})
    assert_openai_error(r, 400, "prompt_too_long", "prompt")
    assert len(engine.calls) == 1  # refused before reaching the engine


def test_max_output_tokens_bounds_and_defaults_max_tokens():
    client, engine = app_client(max_output_tokens=8)
    assert chat(client, max_tokens=8).status_code == 200
    assert engine.calls[-1][1].max_tokens == 8
    assert_openai_error(chat(client, max_tokens=9), 400, "invalid_value", "max_tokens")
    assert_openai_error(chat(client, max_completion_tokens=100), 400, "invalid_value", "max_tokens")
    assert chat(client).status_code == 200  # no max_tokens: the server's limit applies
    assert engine.calls[-1][1].max_tokens == 8


def test_max_n():
    client, engine = app_client(max_n=2)
    assert chat(client, n=2).status_code == 200
    assert_openai_error(chat(client, n=3), 400, "invalid_value", "n")
    r = client.post("/v1/completions", json={"prompt": "hi", "n": 3})
    assert_openai_error(r, 400, "invalid_value", "n")
    with pytest.raises(ValueError):
        ServerSettings(max_n=9)  # above the protocol's own ceiling


def test_request_timeout_stops_a_request_and_frees_it():
    engine = FakeEngine()
    engine.delay = 0.3  # 3 pieces: 0.9 s
    client, _ = app_client(engine, request_timeout=0.5)
    r = chat(client)
    err = assert_openai_error(r, 504, "request_timeout")
    assert "0.5 s" in err["message"] and err["type"] == "timeout_error"
    assert engine.aborted, "the engine request must be aborted (its KV blocks freed)"
    # A stream is already 200: it ends with an error event, then [DONE].
    engine.aborted.clear()
    with client.stream("POST", CHAT, json={"messages": [{"role": "user", "content": "hi"}], "stream": True}) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert '"request_timeout"' in lines[-2]
    assert engine.aborted
    # Within the limit nothing changes.
    engine.delay = 0.0
    assert chat(client).status_code == 200


def test_cors_is_off_unless_configured():
    origin = "https://app.example"
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    client, _ = app_client()
    r = client.options(CHAT, headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    assert "access-control-allow-origin" not in chat(client).headers

    client, _ = app_client(allowed_origins=[origin], api_key="k")
    r = client.options(CHAT, headers=preflight)  # a preflight carries no API key
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]},
                    headers={"Origin": origin, "Authorization": "Bearer k"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
    r = client.options(CHAT, headers={**preflight, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"


def test_internal_errors_do_not_leak_paths_or_tracebacks():
    engine = FakeEngine()
    engine.fail_with = RuntimeError("cannot open /home/secret/weights.bin\nTraceback (most recent call last)")
    client, _ = app_client(engine)
    err = assert_openai_error(chat(client), 500, "internal_error")
    assert "/home/secret" not in err["message"] and "Traceback" not in err["message"]
    assert "RuntimeError" not in err["message"]


def test_wrong_api_key_is_401_whatever_its_length():
    client, _ = app_client(api_key="s3cret-key")
    for key in ("", "s", "s3cret-ke", "s3cret-key-and-more", "S3CRET-KEY"):
        r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]},
                        headers={"Authorization": f"Bearer {key}"})
        assert_openai_error(r, 401, "invalid_api_key")
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": "Bearer s3cret-key"})
    assert r.status_code == 200


def test_serve_defaults_are_safe():
    """Loopback bind, no CORS, no request limit below the context, body limit on (flags -> settings)."""
    from dspark_serve.server.cli import build_parser
    from dspark_serve.server.serve import resolve_serve_args, server_settings_from_args

    args = resolve_serve_args(build_parser().parse_args(["serve"]), environ={})
    assert args.host == "127.0.0.1"
    s = server_settings_from_args(args)
    assert s.allowed_origins == [] and s.api_key is None and s.request_timeout is None
    assert s.max_request_body_size == 8 << 20 and s.max_n == 8
    args = resolve_serve_args(build_parser().parse_args(
        ["serve", "--allowed-origins", "https://a.example, https://b.example", "--max-prompt-tokens", "100",
         "--max-output-tokens", "50", "--max-n", "2", "--request-timeout", "30"]), environ={})
    s = server_settings_from_args(args)
    assert s.allowed_origins == ["https://a.example", "https://b.example"]
    assert (s.max_prompt_tokens, s.max_output_tokens, s.max_n, s.request_timeout) == (100, 50, 2, 30.0)


def test_container_images_bind_all_interfaces_the_cli_does_not():
    """In a pod the server must listen on 0.0.0.0 (the chart runs the image's entrypoint);
    a bare `dspark serve` listens on loopback only (test_serve_defaults_are_safe)."""
    import json

    from dspark_testing import REPO

    for name in ("Dockerfile", "Dockerfile.cuda"):
        lines = (REPO / "deploy" / "docker" / name).read_text().splitlines()
        entry = [json.loads(line.split(None, 1)[1]) for line in lines if line.startswith("ENTRYPOINT")]
        assert entry == [["dspark", "serve", "--host", "0.0.0.0"]], name
