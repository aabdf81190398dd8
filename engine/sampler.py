"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds.

`warp_probs` turns logits into the distribution a request actually samples
from; speculative verification applies the same function to the target's and
the drafter's logits, which is what makes rejection sampling exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling_params import SamplingParams


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> None:
    """In place on one row. Repetition penalty (HF/CTRL style) looks at prompt and
    output; presence/frequency penalties (OpenAI style) at the output only."""
    device = logits.device
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.long, device=device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
    if output_ids and (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0):
        counts = torch.bincount(torch.tensor(output_ids, device=device), minlength=logits.shape[-1])[: logits.shape[-1]]
        logits -= params.frequency_penalty * counts.to(logits.dtype)
        logits -= params.presence_penalty * (counts > 0).to(logits.dtype)


def warp_probs(
    logits: torch.Tensor,  # [B, V] float32
    temperature: torch.Tensor,  # [B], > 0
    top_k: torch.Tensor,  # [B] int, 0 = off
    top_p: torch.Tensor,  # [B], 1 = off
    min_p: torch.Tensor,  # [B], 0 = off
) -> torch.Tensor:
    """The sampling distribution after temperature and truncation, rows summing to 1."""
    logits = logits / temperature.unsqueeze(1)
    vocab = logits.shape[-1]
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
        drop = ranks >= k
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        sp = sorted_logits.softmax(dim=-1)
        before = sp.cumsum(dim=-1) - sp  # mass strictly before each token
        drop = before >= top_p.unsqueeze(1)
        drop[:, 0] = False  # always keep the most likely token
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = torch.where(probs < thresh, torch.zeros_like(probs), probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row (exponential race: argmax p/E, E ~ Exp(1)), seeded rows reproducible."""
    noise = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            noise[i].exponential_(generator=g)
    return (probs / noise).argmax(dim=-1)


@dataclass
class SampleResult:
    token_ids: list[int]
    # Per row: None, or (chosen token logprob, {token: logprob} of the top-k).
    logprobs: list[tuple[float, dict[int, float]] | None]


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list) -> SampleResult:
        """Sample one token for each row of `logits` ([B, V]) for `seqs` (engine Sequences)."""
        raw = logits.float()
        logits = raw
        if any(s.params.has_penalties for s in seqs):
            logits = raw.clone()
            for i, s in enumerate(seqs):
                if s.params.has_penalties:
                    apply_penalties(logits[i], s.params, s.prompt_token_ids, s.output_token_ids)
        greedy = [s.params.greedy for s in seqs]
        tokens = logits.argmax(dim=-1)
        stochastic = [i for i, g in enumerate(greedy) if not g]
        if stochastic:
            sub = logits[stochastic]
            ps = [seqs[i].params for i in stochastic]
            dev = sub.device
            probs = warp_probs(
                sub,
                torch.tensor([p.temperature for p in ps], device=dev),
                torch.tensor([p.top_k for p in ps], device=dev),
                torch.tensor([p.top_p for p in ps], device=dev),
                torch.tensor([p.min_p for p in ps], device=dev),
            )
            tokens[stochastic] = sample_from_probs(probs, [seqs[i].generator for i in stochastic])
        token_list = tokens.tolist()
        lps: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            logp = raw[want].log_softmax(dim=-1)
            for row, i in enumerate(want):
                k = seqs[i].params.logprobs
                chosen = float(logp[row, token_list[i]])
                top: dict[int, float] = {}
                if k:
                    vals, idx = logp[row].topk(k)
                    top = dict(zip(idx.tolist(), vals.tolist()))
                lps[i] = (chosen, top)
        return SampleResult(token_list, lps)
