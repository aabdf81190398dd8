"""The OpenAI wire format: request models (validated strictly) and response/chunk builders.

Requests are pydantic models in strict mode, so `"temperature": "0.5"` or
`"stream": 1` is a 400 rather than a silent coercion; unknown fields are
accepted and ignored, as OpenAI clients send fields we do not implement.
Every numeric and list field has a bound (docs/reliability.md has the table):
the ones that do not depend on the model are the constants below and are checked
here; those that do (top_k and token ids against the vocabulary, min_tokens
against the context length) are checked in serving.py. A value the engine cannot
hold must be a 400 at the door, never a failure of the engine step that it would
share with every request running beside it.

Responses are plain dicts built by the functions at the bottom: the schema
mixes fields that must appear as null (`finish_reason`, `logprobs`) with
fields that must be absent (`delta.role` after the first chunk), which is
clearer to write out than to express with exclusion rules.
"""

from __future__ import annotations

import math
import time
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from dspark_serve.engine.sampling_params import MAX_FLOOR, MAX_INT_PARAM as MAX_PRIORITY

MAX_N = 8  # choices per request
MAX_PROMPTS = 32  # prompts in one /v1/completions batch
MAX_TOP_LOGPROBS = 20
MAX_SEED = 2**63 - 1
# max_tokens, max_completion_tokens, min_tokens: far above any context length, and int32-safe.
MAX_TOKEN_COUNT = 2**31 - 1
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256  # stop strings are searched for in every detokenized delta
MAX_STOP_TOKEN_IDS = 64
MAX_MESSAGES = 4096
MAX_CONTENT_PARTS = 256  # text parts of one message
MAX_ID_CHARS = 256  # `user` and a message's `name`
MAX_MODEL_CHARS = 1024  # `model` (a 404 quotes it back)
MAX_DRAFT_TOKENS = 64
MAX_TOOLS = 128
MAX_TOOL_CALLS = 64  # calls in one assistant message of the history

StopString = Annotated[str, Field(max_length=MAX_STOP_STRING_CHARS)]
TokenCount = Annotated[int, Field(ge=1, le=MAX_TOKEN_COUNT)]
NonNegativeId = Annotated[int, Field(ge=0)]  # the vocabulary bound is the model's: serving.py


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ToolCallFunction(_Strict):
    name: str = Field(..., max_length=MAX_ID_CHARS)
    arguments: str | dict = "{}"


class ToolCall(_Strict):
    id: str | None = Field(None, max_length=MAX_ID_CHARS)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | Annotated[list[ContentPart], Field(max_length=MAX_CONTENT_PARTS)] | None = None
    name: str | None = Field(None, max_length=MAX_ID_CHARS)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOL_CALLS)] | None = None  # assistant
    tool_call_id: str | None = Field(None, max_length=MAX_ID_CHARS)  # tool


class SamplingFields(_Strict):
    """Fields shared by chat and text completions (OpenAI's, plus vLLM's common extensions)."""

    model: str | None = Field(None, max_length=MAX_MODEL_CHARS)
    max_tokens: TokenCount | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=MAX_SEED - MAX_N)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stop_token_ids: Annotated[list[NonNegativeId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    user: str | None = Field(None, max_length=MAX_ID_CHARS)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=MAX_TOKEN_COUNT)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # dspark extension: cap this request's speculative drafts (0: plain decoding for it).
    max_draft_tokens: int | None = Field(None, ge=0, le=MAX_DRAFT_TOKENS)
    # dspark extension: this request's speed floor in output tokens/s after the first token (None: the
    # server's --sla-min-tokens-per-s; 0: none). vLLM's priority: lower values are admitted first.
    min_tokens_per_s: float | None = Field(None, ge=0.0, le=MAX_FLOOR, allow_inf_nan=False)
    priority: int = Field(0, ge=-MAX_PRIORITY, le=MAX_PRIORITY)
    # structured outputs, vLLM's names: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}
    # and the older guided_* fields (engine/structured.py bounds their size)
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(max_length=1024)] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None

    # OpenAI / vLLM fields this server does not implement -> the values that mean "not used".
    # Any other value is a 400 `unsupported`: ignoring it would answer a different request.
    NOT_IMPLEMENTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "logit_bias": lambda v: v is None or v == {},
        "best_of": lambda v: v is None or (type(v) is int and v == 1),
        "use_beam_search": lambda v: v is None or v is False,
        "prompt_logprobs": lambda v: v is None,
    }

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_field(self) -> str | None:
        """The first field set to something this server does not implement (None: none)."""
        extra = self.model_extra or {}
        for name, unused in self.NOT_IMPLEMENTED.items():
            if name in extra and not unused(extra[name]):
                return name
        return None


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: TokenCount | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    response_format: dict | None = None
    tools: Annotated[list[dict], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    # passed to the chat template (e.g. Qwen3's {"enable_thinking": false})
    chat_template_kwargs: dict | None = None

    NOT_IMPLEMENTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "functions": lambda v: v is None or v == [],  # the deprecated forms of tools / tool_choice
        "function_call": lambda v: v is None or v == "none",
        **SamplingFields.NOT_IMPLEMENTED,
    }

    @property
    def output_limit(self) -> int | None:
        # max_completion_tokens is the newer name; it wins when both are given.
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Engine `logprobs`: None (off), 0 (the chosen token only) or k alternatives."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    NOT_IMPLEMENTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "suffix": lambda v: v is None or v == "",
        **SamplingFields.NOT_IMPLEMENTED,
    }

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------- responses


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> dict:
    """OpenAI's usage object; `cached_tokens`: prompt tokens the prefix cache supplied."""
    out = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
    if cached_tokens is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return out


def cached_tokens(finals: dict, stride: int = 1) -> int:
    """Prompt tokens served from the prefix cache, counted once per prompt: the first choice of
    each (finals maps choice index -> RequestOutput; choices of one prompt are `stride` apart)."""
    return sum(int(out.metrics.get("num_cached_tokens", 0)) for i, out in finals.items() if i % stride == 0)


def _finite(lp: float) -> float:
    # JSON has no -Infinity; a token with zero probability gets a very low finite value.
    return lp if math.isfinite(lp) else -9999.0


class TokenText:
    """Token id -> its text for logprobs, cached (the same ids recur across requests)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self._cache.get(token_id)
        if s is None:
            s = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = s
        return s


def chat_logprobs(entries: list[dict], token_text: TokenText, top_n: int) -> dict:
    """Engine logprob entries -> OpenAI chat `logprobs` ({"content": [...]})."""

    def item(tid: int, lp: float) -> dict:
        s = token_text(tid)
        return {"token": s, "logprob": _finite(lp), "bytes": list(s.encode("utf-8"))}

    content = []
    for e in entries:
        top = sorted(e["top"].items(), key=lambda kv: -kv[1])[:top_n]
        content.append({**item(e["token_id"], e["logprob"]), "top_logprobs": [item(t, lp) for t, lp in top]})
    return {"content": content}


def completion_logprobs(entries: list[dict], token_text: TokenText, text_offset: int) -> dict:
    """Engine logprob entries -> OpenAI legacy completions `logprobs`; offsets start at `text_offset`."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in entries:
        s = token_text(e["token_id"])
        tokens.append(s)
        lps.append(_finite(e["logprob"]))
        tops.append({token_text(t): _finite(lp) for t, lp in sorted(e["top"].items(), key=lambda kv: -kv[1])})
        offsets.append(text_offset)
        text_offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_response(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_choice(index: int, text: str | None, finish_reason: str | None, logprobs: dict | None,
                tool_calls: list[dict] | None = None, reasoning: str | None = None,
                with_reasoning: bool = False) -> dict:
    message = {"role": "assistant", "content": text}
    if with_reasoning:  # --reasoning-parser: always present, null when the model did not think
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_chunk(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None = None,
               with_usage_field: bool = False) -> dict:
    chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices}
    if with_usage_field:  # stream_options.include_usage: every chunk has "usage", null until the last
        chunk["usage"] = usage_
    return chunk


def chat_chunk_choice(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_chunk(rid: str, created: int, model: str, choices: list[dict], usage_: dict | None = None,
                     with_usage_field: bool = False) -> dict:
    chunk = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices}
    if with_usage_field:
        chunk["usage"] = usage_
    return chunk
