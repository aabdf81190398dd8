"""Per-request sampling and stopping parameters (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

from dspark_serve.scheduler.sla import MAX_FLOOR

# The sampler and the stop checks build int64 tensors from these per step: a value past this bound
# would overflow there and fail the whole step (every request in it), so it is refused here instead.
MAX_INT_PARAM = 2**31 - 1


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


# Temperatures below this sample greedily (vLLM's _SAMPLING_EPS): dividing logits by a tiny
# positive temperature overflows to inf/NaN. The sampling tensors floor temperatures at it too.
SAMPLING_EPS = 1e-5


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: plus top-k
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Speculation cap for this request (None: the server's setting; 0: no speculation).
    max_draft_tokens: int | None = None
    # Speed floor of this request in output tokens/s after its first token (None: the server's
    # --sla-min-tokens-per-s; 0: none). The load-aware scheduler weighs a request below it more in the
    # plan and holds admissions that would push the per-user speed below the floors (scheduler/sla.py).
    min_tokens_per_s: float | None = None
    # Admission order (vLLM's name): lower values are admitted first and preempted last; FCFS within one.
    priority: int = 0
    # A grammar the output must follow (engine.structured.GrammarSpec: JSON schema, regex, choice...).
    structured: Any = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.validate()

    def validate(self) -> None:
        def bad(msg: str, param: str) -> None:
            raise SamplingParamsError(msg, param)

        if not isinstance(self.n, int) or self.n < 1:
            bad(f"n must be at least 1, got {self.n}", "n")
        for name in ("top_k", "min_tokens"):
            v = getattr(self, name)
            if not _is_int(v) or v > MAX_INT_PARAM:
                bad(f"{name} must be an integer of at most {MAX_INT_PARAM}, got {v!r}", name)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens > MAX_INT_PARAM):
            bad(f"max_tokens must be an integer of at most {MAX_INT_PARAM}, got {self.max_tokens!r}", "max_tokens")
        if not all(_is_int(t) and 0 <= t <= MAX_INT_PARAM for t in self.stop_token_ids):
            bad("stop_token_ids must be non-negative integer token ids", "stop_token_ids")
        if self.seed is not None and not _is_int(self.seed):
            bad(f"seed must be an integer, got {self.seed!r}", "seed")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            bad(f"temperature must be non-negative, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            bad(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if self.top_k < 0:
            bad(f"top_k must be -1 (disabled) or positive, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            bad(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if self.max_tokens is not None and self.max_tokens < 1:
            bad(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if self.min_tokens < 0:
            bad(f"min_tokens must be non-negative, got {self.min_tokens}", "min_tokens")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad(f"repetition_penalty must be positive, got {self.repetition_penalty}", "repetition_penalty")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad(f"logprobs must be in [0, 20], got {self.logprobs}", "logprobs")
        if self.max_draft_tokens is not None and self.max_draft_tokens < 0:
            bad(f"max_draft_tokens must be non-negative, got {self.max_draft_tokens}", "max_draft_tokens")
        if self.min_tokens_per_s is not None and (
                isinstance(self.min_tokens_per_s, bool) or not isinstance(self.min_tokens_per_s, (int, float))
                or not math.isfinite(self.min_tokens_per_s) or not 0.0 <= self.min_tokens_per_s <= MAX_FLOOR):
            bad(f"min_tokens_per_s must be a number in [0, {MAX_FLOOR:g}], got {self.min_tokens_per_s!r}", "min_tokens_per_s")
        if not _is_int(self.priority) or abs(self.priority) > MAX_INT_PARAM:
            bad(f"priority must be an integer in [-{MAX_INT_PARAM}, {MAX_INT_PARAM}], got {self.priority!r}", "priority")
        if self.structured is not None:
            from .structured import GrammarSpec

            if not isinstance(self.structured, GrammarSpec):
                bad("structured must be an engine.structured.GrammarSpec", "structured")

    @property
    def greedy(self) -> bool:
        """The one rule for greedy decoding, shared by plain sampling and speculative verification."""
        return self.temperature < SAMPLING_EPS or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


class SamplingParamsError(ValueError):
    """A parameter out of range; `param` names it (the server maps it to a 400)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
