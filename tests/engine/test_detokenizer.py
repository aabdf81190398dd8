"""Incremental detokenization equals decoding everything at once, also across split UTF-8."""

from __future__ import annotations

import pytest

from dspark_serve.engine.detokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "Emoji: 🚀🔥 and accents: café, naïve, Ærøskøbing.",
    "中文字符和日本語のテキスト、한국어도 있습니다。",
    "  leading spaces, tabs\tand\nnewlines\n\n",
    "Math: ∑ᵢ xᵢ² ≥ 0 → ∞ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_equals_full_decode(default_tokenizer, text):
    tok = default_tokenizer
    prompt = tok.encode("Say something:", add_special_tokens=False)
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt)
    pieces = [det.add([t]) for t in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == tok.decode(ids)
    # No piece ever shows a broken character.
    assert all("\ufffd" not in p for p in pieces)


def test_multibyte_characters_span_several_tokens(default_tokenizer):
    ids = default_tokenizer.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # byte-level BPE splits it: the case this class exists for
    det = IncrementalDetokenizer(default_tokenizer, [])
    assert det.add(ids[:1]) == ""
    assert "".join(det.add([t]) for t in ids[1:]) == "🚀"


def test_flush_emits_an_incomplete_tail(default_tokenizer):
    ids = default_tokenizer.encode("a🚀", add_special_tokens=False)
    det = IncrementalDetokenizer(default_tokenizer, [])
    text = "".join(det.add([t]) for t in ids[:-1])
    text += det.flush()
    assert text.startswith("a") and text.endswith("\ufffd")


def test_special_tokens_skipped(default_tokenizer):
    tok = default_tokenizer
    ids = tok.encode("Hi", add_special_tokens=False) + [tok.eos_token_id]
    det = IncrementalDetokenizer(tok, [])
    assert "".join(det.add([t]) for t in ids) + det.flush() == "Hi"
