"""Model defaults and templates (issue 32, part 4): --reasoning-parser, --chat-template,
--generation-config, chat_template_kwargs; in process, with the fake engine."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from fake_engine import FakeEngine
from dspark_serve.server import reasoning as R
from dspark_serve.server.app import ServerSettings, create_app

CHAT = "/v1/chat/completions"


def _body(**kw):
    return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **kw}


@pytest.mark.parametrize("text,parser,want", [
    ("<think>plan</think>answer", "qwen3", ("plan", "answer")),
    ("  <think>\nplan\n</think>\n\nanswer", "qwen3", ("plan", "answer")),
    ("no thinking", "qwen3", (None, "no thinking")),
    ("<think>unfinished", "qwen3", ("unfinished", None)),  # it stopped while thinking
    ("plan</think>answer", "deepseek_r1", ("plan", "answer")),
    ("<think>plan</think>answer", "deepseek_r1", ("plan", "answer")),
    ("still thinking", "deepseek_r1", ("still thinking", None)),
])
def test_split(text, parser, want):
    assert R.split(text, parser) == want


@pytest.mark.parametrize("parser", R.PARSERS)
@pytest.mark.parametrize("text", ["<think>plan a</think>answer b", "plan</think>x", "plain words", "<think>open"])
def test_streamed_pieces_reassemble_to_the_split(parser, text):
    """Fed in every cut of one or two characters, the pieces give the same split."""
    for step in (1, 2, 5):
        s = R.StreamSplitter(parser)
        got = {"reasoning": "", "content": ""}
        for i in range(0, len(text), step):
            for kind, piece in s.feed(text[i:i + step]):
                got[kind] += piece
        for kind, piece in s.feed("", final=True):
            got[kind] += piece
        reasoning, content = R.split(text, parser)
        assert (got["reasoning"].strip() or None) == reasoning
        assert (got["content"].strip() or None) == (content.strip() if content else None)


def test_reasoning_content_whole_and_streamed():
    engine = FakeEngine(pieces=["<thi", "nk>step one", "</th", "ink>The answer", "."])
    with TestClient(create_app(engine, ServerSettings(reasoning_parser="qwen3"))) as c:
        msg = c.post(CHAT, json=_body()).json()["choices"][0]["message"]
        assert msg["reasoning_content"] == "step one" and msg["content"] == "The answer."
        reasoning = content = ""
        with c.stream("POST", CHAT, json=_body(stream=True)) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for ch in json.loads(line[6:])["choices"]:
                        reasoning += ch["delta"].get("reasoning_content") or ""
                        content += ch["delta"].get("content") or ""
        assert reasoning == "step one" and content == "The answer."


def test_without_a_parser_there_is_no_reasoning_field():
    with TestClient(create_app(FakeEngine(pieces=["<think>x</think>y"]), ServerSettings())) as c:
        msg = c.post(CHAT, json=_body()).json()["choices"][0]["message"]
        assert "reasoning_content" not in msg and msg["content"] == "<think>x</think>y"


def test_chat_template_override_and_template_kwargs():
    engine = FakeEngine()
    template = "{% for m in messages %}[{{ m.content }}]{% endfor %}{% if flag %}!{% endif %}"
    with TestClient(create_app(engine, ServerSettings(chat_template=template))) as c:
        assert c.post(CHAT, json=_body()).status_code == 200
        assert c.post(CHAT, json=_body(chat_template_kwargs={"flag": True})).status_code == 200
        r = c.post(CHAT, json=_body(chat_template_kwargs={"chat_template": "x"}))
        assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
    enc = engine.tokenizer.encode
    assert engine.calls[0][2] == enc("[hi]") and engine.calls[1][2] == enc("[hi]!")


@pytest.mark.parametrize("mode", ["auto", "vllm"])
def test_generation_config_defaults(tmp_path, mode):
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "top_p": 0.95, "top_k": 20,
                                                                  "do_sample": True}))
    engine = FakeEngine(model_path=str(tmp_path))
    with TestClient(create_app(engine, ServerSettings(generation_config=mode))) as c:
        assert c.post(CHAT, json=_body()).status_code == 200
        assert c.post(CHAT, json=_body(temperature=0.0, top_k=5)).status_code == 200
    default, explicit = engine.calls[0][1], engine.calls[1][1]
    if mode == "auto":
        assert (default.temperature, default.top_p, default.top_k) == (0.6, 0.95, 20)
    else:
        assert (default.temperature, default.top_p, default.top_k) == (1.0, 1.0, 0)
    assert (explicit.temperature, explicit.top_k, explicit.top_p) == (0.0, 5, 0.95 if mode == "auto" else 1.0)
