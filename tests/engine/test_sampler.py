"""Sampling: truncation rules, distribution, seeds, penalties, logprobs."""

from __future__ import annotations

import torch
from scipy.stats import chisquare

from engine.sampler import Sampler, apply_penalties, sample_from_probs, warp_probs
from engine.sampling_params import SamplingParams


class _Seq:
    def __init__(self, params, prompt=(), output=()):
        self.params = params
        self.prompt_token_ids = list(prompt)
        self.output_token_ids = list(output)
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)


def _warp(logits, t=1.0, k=0, p=1.0, m=0.0):
    n = logits.shape[0]
    return warp_probs(logits, torch.full((n,), t), torch.full((n,), k), torch.full((n,), p), torch.full((n,), m))


def test_top_k_keeps_the_k_most_likely():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    probs = _warp(logits, k=2)
    assert (probs[0] > 0).tolist() == [False, True, True, False, False]
    torch.testing.assert_close(probs.sum(), torch.tensor(1.0))


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs_in = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    probs = _warp(probs_in.log(), p=0.8)
    assert (probs[0] > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(probs[0, :2], torch.tensor([0.625, 0.375]))
    # top_p smaller than the first token's mass keeps just that token
    assert (_warp(probs_in.log(), p=0.1)[0] > 0).tolist() == [True, False, False, False]


def test_min_p_drops_tokens_below_fraction_of_max():
    probs_in = torch.tensor([[0.6, 0.3, 0.06, 0.04]])
    probs = _warp(probs_in.log(), m=0.1)
    assert (probs[0] > 0).tolist() == [True, True, False, False]


def test_temperature_sharpens():
    logits = torch.tensor([[1.0, 2.0]])
    assert _warp(logits, t=0.5)[0, 1] > _warp(logits, t=1.0)[0, 1] > _warp(logits, t=2.0)[0, 1]


def test_samples_follow_the_distribution_chi_square():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    g = torch.Generator().manual_seed(123)
    draws = torch.stack([sample_from_probs(probs[None], [g]) for _ in range(4000)]).flatten()
    counts = torch.bincount(draws, minlength=5).double()
    assert chisquare(counts.numpy(), (probs.double() * 4000).numpy()).pvalue > 0.01


def test_seeded_rows_reproducible_regardless_of_batch():
    logits = torch.randn(3, 100)
    sampler = Sampler()
    a = sampler(logits, [_Seq(SamplingParams(temperature=1.0, seed=s)) for s in (1, 2, 3)]).token_ids
    b = sampler(logits[1:2], [_Seq(SamplingParams(temperature=1.0, seed=2))]).token_ids
    c = sampler(logits, [_Seq(SamplingParams(temperature=1.0, seed=s)) for s in (1, 2, 3)]).token_ids
    assert a == c and a[1] == b[0]


def test_greedy_is_argmax_and_logprobs_are_raw_log_softmax():
    logits = torch.randn(2, 50)
    out = Sampler()(logits, [_Seq(SamplingParams(temperature=0.0, logprobs=3))] * 2)
    assert out.token_ids == logits.argmax(-1).tolist()
    chosen, top = out.logprobs[0]
    ref = logits[0].log_softmax(-1)
    assert abs(chosen - ref.max().item()) < 1e-5
    assert list(top) == ref.topk(3).indices.tolist()


def test_penalties():
    logits = torch.tensor([2.0, -2.0, 1.0, 1.0])
    x = logits.clone()
    apply_penalties(x, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1])
    assert x.tolist() == [1.0, -4.0, 1.0, 1.0]
    x = logits.clone()
    apply_penalties(x, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), prompt_ids=[0], output_ids=[2, 2, 3])
    assert x.tolist() == [2.0, -2.0, 1.0 - 0.5 - 0.5, 1.0 - 0.5 - 0.25]
