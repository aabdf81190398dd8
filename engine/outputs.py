"""What the engine hands back: vLLM-shaped request outputs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str  # all text so far
    token_ids: list[int]  # all output tokens so far
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop string or stop token that ended it
    cumulative_logprob: float | None = None
    # Per output token: {"token_id", "logprob", "top": {token_id: logprob}}; None unless asked.
    logprobs: list[dict] | None = None
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[dict] | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    error: str | None = None
    metrics: dict = field(default_factory=dict)
    # why it failed, for the server's answer: "grammar_dead_end" (the request's output constraint
    # cannot be continued with this model's tokenizer: a client error), else None (internal)
    error_code: str | None = None
