"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, per-request seeds.

`warp_probs` turns logits into the distribution a request actually samples
from; speculative verification applies the same function to the target's and
the drafter's logits, which is what makes rejection sampling exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling_params import SAMPLING_EPS, SamplingParams


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


def sampling_tensors(params_list: list[SamplingParams], device, vocab_size: int | None = None):
    """(temperature, top_k, top_p, min_p) as [B] tensors for `warp_probs`: the one builder of
    plain and speculative sampling. Greedy requests (SamplingParams.greedy) take the argmax and
    never need these; the SAMPLING_EPS floor only keeps a stray tiny temperature finite. A top_k
    of at least the vocabulary (or beyond int64, without `vocab_size`) keeps every token: 0, off."""
    top_k_limit = vocab_size or torch.iinfo(torch.long).max
    return (
        torch.tensor([max(p.temperature, SAMPLING_EPS) for p in params_list], device=device),
        torch.tensor([p.top_k if p.top_k < top_k_limit else 0 for p in params_list], device=device),
        torch.tensor([p.top_p for p in params_list], device=device),
        torch.tensor([p.min_p for p in params_list], device=device),
    )


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


def top_logprobs(logp: torch.Tensor, k: int) -> dict[int, float]:
    """{token: logprob} of the k most likely tokens of one row of log-probabilities (k = 0: {}):
    what `logprobs` / `top_logprobs` report, for sampled and for verified tokens alike."""
    if not k:
        return {}
    vals, idx = logp.topk(k)
    return dict(zip(idx.tolist(), vals.tolist()))


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
    token_ids: list[int | None]
    # Per row: None, or (chosen token logprob, {token: logprob} of the top-k).
    logprobs: list[tuple[float, dict[int, float]] | None]
    # Row -> the exception its preparation raised; that row has no token and its request fails alone.
    errors: dict[int, Exception] = field(default_factory=dict)


@dataclass
class _Prepared:
    logits: torch.Tensor  # [B, V] after penalties
    stochastic: list[int]  # rows that draw (the others take the argmax)
    probs: torch.Tensor | None  # [len(stochastic), V] their warped distributions
    want: list[int]  # rows that asked for logprobs
    logp: torch.Tensor | None  # [len(want), V] raw log-softmax of those rows
    top: list[dict[int, float]]  # their top-k logprobs


class Sampler:
    def __call__(self, logits: torch.Tensor, seqs: list, faults=None) -> SampleResult:
        """Sample one token for each row of `logits` ([B, V]) for `seqs` (engine Sequences).

        A request whose preparation (penalties, sampling tensors, truncation, top-k logprobs)
        raises fails alone: its row is in `errors` and the others get exactly the tokens they
        would have got without it. `faults`: the engine's test-only FaultInjector, or None."""
        raw = logits.float()
        try:
            prepared = self._prepare(raw, seqs, faults)
        except Exception as e:
            return self._isolate(raw, seqs, faults, e)
        return self._draw(prepared, seqs)

    def _prepare(self, raw: torch.Tensor, seqs: list, faults) -> _Prepared:
        """Every per-request computation that can fail, and no random draw: a batch that fails
        here is redone without its failing rows, and seeded rows still draw their own next uniform."""
        if faults is not None:
            faults.before_prepare([s.request_id for s in seqs])
        logits = raw
        if any(s.params.has_penalties for s in seqs):
            logits = raw.clone()
            for i, s in enumerate(seqs):
                if s.params.has_penalties:
                    apply_penalties(logits[i], s.params, s.prompt_token_ids, s.output_token_ids)
        stochastic = [i for i, s in enumerate(seqs) if not s.params.greedy]
        probs = None
        if stochastic:
            tensors = sampling_tensors([seqs[i].params for i in stochastic], logits.device, logits.shape[-1])
            probs = warp_probs(logits[stochastic], *tensors)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        logp, top = None, []
        if want:
            logp = raw[want].log_softmax(dim=-1)
            top = [top_logprobs(logp[row], seqs[i].params.logprobs) for row, i in enumerate(want)]
        return _Prepared(logits, stochastic, probs, want, logp, top)

    @staticmethod
    def _draw(p: _Prepared, seqs: list) -> SampleResult:
        tokens = p.logits.argmax(dim=-1)
        if p.stochastic:
            tokens[p.stochastic] = sample_from_probs(p.probs, [seqs[i].generator for i in p.stochastic])
        token_list = tokens.tolist()
        lps: list = [None] * len(seqs)
        for row, i in enumerate(p.want):
            lps[i] = (float(p.logp[row, token_list[i]]), p.top[row])
        return SampleResult(token_list, lps)

    def _isolate(self, raw: torch.Tensor, seqs: list, faults, batch_error: Exception) -> SampleResult:
        """After a failed batch: prepare row by row to find the failing requests, then sample
        the others as one batch. A failure no single row reproduces is the step's (re-raised)."""
        errors = {}
        for i, s in enumerate(seqs):
            try:
                self._prepare(raw[i:i + 1], [s], faults)
            except Exception as e:
                errors[i] = e
        if not errors:
            raise batch_error
        ok = [i for i in range(len(seqs)) if i not in errors]
        result = SampleResult([None] * len(seqs), [None] * len(seqs), errors)
        if ok:
            rest = [seqs[i] for i in ok]
            sampled = self._draw(self._prepare(raw[ok], rest, faults), rest)
            for j, i in enumerate(ok):
                result.token_ids[i] = sampled.token_ids[j]
                result.logprobs[i] = sampled.logprobs[j]
        return result
