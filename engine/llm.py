"""Offline API shaped like vLLM's: `LLM(...).generate(...)` and `.chat(...)`."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any, Sequence as Seq

from .engine import EngineConfig, LLMEngine
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams


def apply_chat_template(tokenizer, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
    """Token ids of a conversation rendered with the model's chat template."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False, **kwargs)
    return tokenizer.encode(text, add_special_tokens=False)


class LLM:
    def __init__(
        self,
        model: str | None = None,
        dtype: str = "auto",
        *,
        quantization: str = "auto",
        seed: int = 0,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 1024,
        max_model_len: int | None = None,
        block_size: int = 16,
        kv_cache_memory: int | None = None,
        device: str = "auto",
        num_threads: int | None = None,
        speculative_config: dict[str, Any] | None = None,
        enable_prefix_caching: bool = True,
        enforce_eager: bool | None = None,
    ):
        self.engine = LLMEngine(
            EngineConfig(
                model=model, dtype=dtype, quantization=quantization, seed=seed, max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                block_size=block_size, kv_cache_memory=kv_cache_memory, device=device,
                num_threads=num_threads, speculative_config=speculative_config,
                enable_prefix_caching=enable_prefix_caching,
                **({} if enforce_eager is None else {"enforce_eager": enforce_eager}),
            )
        )
        self._ids = itertools.count()

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm._ids = itertools.count()
        return llm

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str] | Seq[list[int]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. Prompts are strings or token-id lists."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        items = [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompts]
        return self._run(items, sampling_params)

    def chat(
        self,
        messages: list[dict] | Seq[list[dict]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        add_generation_prompt: bool = True,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Chat with one conversation (a list of messages) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        tok = self.engine.tokenizer
        items = []
        for conv in convs:
            ids = apply_chat_template(tok, conv, add_generation_prompt, **(chat_template_kwargs or {}))
            items.append((None, ids))
        return self._run(items, sampling_params)

    def _run(self, items, sampling_params) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(items)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(items):
                raise ValueError("one SamplingParams per prompt, or a single one for all")
        engine = self.engine
        groups: list[list[str]] = []
        for (prompt, ids), params in zip(items, params_list):
            rids = []
            for k in range(params.n):
                sub = params
                if params.n > 1:
                    # Each of the n samples gets its own stream (seed + k when seeded).
                    sub = replace(params, n=1, seed=None if params.seed is None else params.seed + k)
                rid = f"offline-{next(self._ids)}"
                engine.add_request(rid, prompt=prompt, params=sub, prompt_token_ids=ids)
                rids.append(rid)
            groups.append(rids)
        final: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    final[out.request_id] = out
        results = []
        for rids in groups:
            first = final[rids[0]]
            comps: list[CompletionOutput] = []
            for k, rid in enumerate(rids):
                c = final[rid].outputs[0]
                c.index = k
                comps.append(c)
            failed = next((final[rid] for rid in rids if final[rid].error is not None), None)
            results.append(RequestOutput(rids[0], first.prompt, first.prompt_token_ids, comps, True, metrics=first.metrics,
                                         error=failed.error if failed else None,
                                         error_code=failed.error_code if failed else None))
        return results
