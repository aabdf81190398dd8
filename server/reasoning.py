"""Reasoning parsers (`--reasoning-parser`, vLLM's names): the model's thinking, between
``<think>`` and ``</think>``, goes to the message's ``reasoning_content`` and the rest to
``content``.

- ``qwen3``: a ``<think>`` block at the start is reasoning (with ``enable_thinking: false`` in
  `chat_template_kwargs` Qwen3 writes no block: all content); an output that ends inside the
  block (max_tokens) is all reasoning.
- ``deepseek_r1``: the template opens the block itself, so everything up to ``</think>`` is
  reasoning, with or without a ``<think>`` in the output; no ``</think>`` yet: all reasoning.
"""

from __future__ import annotations

from .tools import partial_suffix

PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


def split(text: str, parser: str) -> tuple[str | None, str | None]:
    """(reasoning_content, content) of a finished output."""
    body = text.lstrip()
    opened = body.startswith(START)
    if opened:
        body = body[len(START):]
    end = body.find(END)
    if end < 0:
        if parser == "deepseek_r1" or opened:  # it stopped while thinking (max_tokens): all reasoning,
            return body.strip() or None, None  # as the stream has already sent it
        return None, text  # qwen3 without a block: no reasoning
    if parser == "qwen3" and not opened:
        return None, text
    reasoning, content = body[:end].strip(), body[end + len(END):].lstrip()
    return reasoning or None, content or None


class StreamSplitter:
    """Streamed text deltas -> ("reasoning", text) / ("content", text) pieces, holding back text
    that may be the start of a tag until it is known."""

    def __init__(self, parser: str):
        self.parser = parser
        self._buf = ""
        # deepseek_r1 starts inside the block (an opening tag, if the model writes one, is dropped);
        # qwen3 decides on the first non-space characters
        self._state = "start"

    def feed(self, delta: str, final: bool = False) -> list[tuple[str, str]]:
        self._buf += delta
        out: list[tuple[str, str]] = []
        if self._state == "start":
            body = self._buf.lstrip()
            if len(body) < len(START) and START.startswith(body) and not final:
                return out  # could still become <think>
            if body.startswith(START):
                self._state, self._buf = "reasoning", body[len(START):]
            else:
                self._state = "reasoning" if self.parser == "deepseek_r1" else "content"
        if self._state == "reasoning":
            end = self._buf.find(END)
            if end >= 0:
                if self._buf[:end]:
                    out.append(("reasoning", self._buf[:end]))
                self._state, self._buf = "content", self._buf[end + len(END):].lstrip()
            else:
                keep = 0 if final else partial_suffix(self._buf, END)
                text, self._buf = self._buf[:len(self._buf) - keep], self._buf[len(self._buf) - keep:]
                if text:
                    out.append(("reasoning", text))
                return out
        if self._state == "content" and self._buf:
            out.append(("content", self._buf))
            self._buf = ""
        return out
