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
        fast = _truncate_top_candidates(logits, top_k, top_p)
        if fast is not None:
            logits = fast
            return _min_p(logits.softmax(dim=-1), min_p)
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
    return _min_p(logits.softmax(dim=-1), min_p)


def _min_p(probs: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    if bool((min_p > 0).any()):
        thresh = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        probs = torch.where(probs < thresh, torch.zeros_like(probs), probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


TOP_CANDIDATES = 1024


def _truncate_top_candidates(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor | None:
    """Top-k/top-p truncation from the TOP_CANDIDATES best logits instead of a full-vocabulary
    sort (a [64, 49152] sort is most of a CPU decode step's sampling time).

    Exact whenever every row's kept set lies inside its candidates: a row with 0 < top_k <= C,
    or whose candidates already hold top_p of the (top-k) mass; otherwise returns None and the
    caller sorts the whole vocabulary. Rows with neither truncation keep their full logits."""
    vocab = logits.shape[-1]
    c = min(TOP_CANDIDATES, vocab)
    if c == vocab:
        return None
    vals, idx = logits.topk(c, dim=-1)  # sorted, descending
    ranks = torch.arange(c, device=logits.device).unsqueeze(0)
    k = torch.where(top_k > 0, top_k.clamp_max(vocab), torch.full_like(top_k, vocab)).unsqueeze(1)
    in_k = (k <= c).squeeze(1)
    # normaliser of the (top-k masked) distribution: over the top-k when they are all candidates
    top = vals[:, :1]
    norm_full = (top + (logits - top).exp().sum(dim=-1, keepdim=True).log()).squeeze(1)  # faster than logsumexp on CPU
    norm_k = torch.logsumexp(vals.masked_fill(ranks >= k, float("-inf")), dim=-1)
    norm = torch.where(in_k, norm_k, norm_full).unsqueeze(1)
    sp = (vals - norm).exp().masked_fill(ranks >= k, 0.0)
    before = sp.cumsum(dim=-1) - sp
    truncating = (top_k > 0) | (top_p < 1.0)
    covered = in_k | ((before[:, -1] + sp[:, -1]) >= top_p)
    if not bool((covered | ~truncating).all()):
        return None
    drop = (ranks >= k) | (before >= top_p.unsqueeze(1))
    drop[:, 0] = False
    kept = vals.masked_fill(drop, float("-inf"))
    out = torch.full_like(logits, float("-inf")).scatter_(1, idx, kept)
    return torch.where(truncating.unsqueeze(1), out, logits)


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """One draw per row by inverting the CDF with ONE uniform per row (seeded rows draw it from
    their own generator, so they are reproducible). A zero-probability token is never drawn:
    the search takes the first index whose cumulative mass exceeds u * total. About 10x faster
    on a CPU than racing exponential noise over the whole vocabulary."""
    n = probs.shape[0]
    u = torch.empty(n, 1, dtype=torch.float64, device=probs.device)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        u[unseeded] = torch.rand(len(unseeded), 1, dtype=torch.float64, device=probs.device)
    for i, g in enumerate(generators):
        if g is not None:
            u[i] = torch.rand(1, dtype=torch.float64, generator=g, device=probs.device)
    cdf = probs.double().cumsum(dim=-1)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.squeeze(1).clamp_max(probs.shape[1] - 1)


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
