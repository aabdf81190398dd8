"""One generation request as the engine sees it."""

from __future__ import annotations

import enum
import time

import torch

from dspark_serve.scheduler.sla import FloorView

from .block_manager import BlockTable
from .detokenizer import IncrementalDetokenizer
from .sampling_params import SamplingParams



_M64 = (1 << 64) - 1


def mix_seed(seed: int) -> int:
    """splitmix64 of a request seed. Generators seeded with consecutive integers (seed=0, 1, 2...
    is how clients seed) give correlated first draws (torch's float64 uniforms fail a KS test
    at p < 0.01); mixed seeds do not, and sampling draws one uniform per token."""
    x = (seed + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)

class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        tokenizer=None,
        prompt: str | None = None,
        arrival_time: float | None = None,
        device: torch.device | str = "cpu",
    ):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids: list[int] = list(prompt_token_ids)  # prompt + output
        self.params = params
        self.status = SequenceStatus.WAITING
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.finish_time: float | None = None
        # Tokens of token_ids whose KV is in the cache. The step feeds
        # token_ids[num_computed:] (a prefill chunk, or the last sampled token).
        self.num_computed_tokens = 0
        self.block_table = BlockTable()
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.stop_reason: int | str | None = None
        self.error: str | None = None
        self.error_code: str | None = None  # RequestOutput.error_code
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens the prefix cache supplied at first admission
        self.output_logprobs: list[dict] = []
        self.cumulative_logprob = 0.0
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(mix_seed(params.seed))
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, self.prompt_token_ids, params.skip_special_tokens)
            if tokenizer is not None
            else None
        )
        self.floor = 0.0  # its speed floor in tokens/s (the engine resolves the server default); 0: none
        self.grammar = None  # engine.structured.GrammarMatcher of a constrained request (set by the engine)
        self.output_text = ""  # text emitted so far (stop strings already cut)
        self._text_sent = 0  # chars of output_text already handed out
        self._tokens_sent = 0  # output tokens already handed out

    def floor_view(self, now: float) -> FloorView:
        """Its speed floor and its decode speed so far (tokens after the first, seconds since it)."""
        if self.first_token_time is None:
            return FloorView(self.floor, 0, 0.0)
        return FloorView(self.floor, self.num_output_tokens - 1, max(0.0, now - self.first_token_time))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_pending_tokens(self) -> int:
        """Tokens to feed before the next sample (prefill remainder, or 1)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_pending_tokens > 1

    @property
    def finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens}, {self.status.value})"
        )
