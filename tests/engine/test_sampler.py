"""Sampling: truncation rules, distribution, seeds, penalties, logprobs, failures that stay with their row."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from dspark_serve.engine.faults import FaultInjector
from dspark_serve.engine.sampler import Sampler, apply_penalties, sample_from_probs, sampling_tensors, warp_probs
from dspark_serve.engine.sampling_params import SAMPLING_EPS, SamplingParams


class _Seq:
    def __init__(self, params, prompt=(), output=(), request_id="r"):
        self.request_id = request_id
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


@pytest.mark.parametrize("temperature", [0.2, 0.7, 1.5])
def test_top_candidate_truncation_equals_the_full_sort(temperature, monkeypatch):
    """top-k/top-p from the best TOP_CANDIDATES logits is the same distribution as a full sort."""
    import dspark_serve.engine.sampler as S

    torch.manual_seed(1)
    b, v = 12, 5000
    logits = torch.randn(b, v) * 4
    top_k = torch.tensor([0, 0, 5, 40, 300, 0, 0, 2000, 0, 1, 0, 0])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.95, 0.8, 1.0, 0.99, 0.9, 0.3, 1.0, 0.7, 0.9])
    min_p = torch.tensor([0.0] * 10 + [0.05, 0.0])
    temp = torch.full((b,), temperature)
    monkeypatch.setattr(S, "TOP_CANDIDATES", 256)
    fast_used = S._truncate_top_candidates(logits / temp.unsqueeze(1), top_k, top_p) is not None
    fast = S.warp_probs(logits, temp, top_k, top_p, min_p)
    monkeypatch.setattr(S, "TOP_CANDIDATES", 10**9)
    full = S.warp_probs(logits, temp, top_k, top_p, min_p)
    assert torch.allclose(fast, full, atol=1e-6)
    # the same kept set, up to float rounding of the cumulative mass at the nucleus boundary
    differ = (fast > 0) != (full > 0)
    assert torch.maximum(fast, full)[differ].max().item() < 1e-6 if differ.any() else True
    if temperature == 0.2:
        assert fast_used  # peaked rows: the candidates hold the nucleus, no full sort
    if temperature == 1.5:
        assert not fast_used  # flat rows: the nucleus is wider than 256 candidates, full sort


def test_consecutive_request_seeds_sample_the_right_distribution():
    """Clients seed requests 0, 1, 2...: one draw per request must still follow the distribution
    (unmixed consecutive seeds fail this: p = 0.009 at offset 100000)."""
    from dspark_serve.engine.sequence import mix_seed

    torch.manual_seed(0)
    p = torch.softmax(torch.randn(8) * 2, -1)
    n = 20000
    for off in (0, 100000):
        gens = [torch.Generator().manual_seed(mix_seed(off + i)) for i in range(n)]
        x = sample_from_probs(p.expand(n, 8).contiguous(), gens)
        counts = torch.bincount(x, minlength=8).double()
        assert chisquare(counts.numpy(), (p.double() * n).numpy()).pvalue > 0.01
    zero = torch.tensor([[0.0, 0.5, 0.0, 0.5]])
    draws = {int(sample_from_probs(zero, [torch.Generator().manual_seed(mix_seed(i))])) for i in range(200)}
    assert draws == {1, 3}  # never a zero-probability token


@pytest.mark.parametrize("temperature", [1e-6, 1e-30, 5e-324])
def test_a_tiny_temperature_is_greedy(temperature):
    """Dividing logits by 5e-324 overflows to inf and NaN; below SAMPLING_EPS a request is greedy."""
    params = SamplingParams(temperature=temperature, seed=3)
    assert params.greedy and not SamplingParams(temperature=SAMPLING_EPS).greedy
    logits = torch.randn(4, 300) * 5
    out = Sampler()(logits, [_Seq(params) for _ in range(4)])
    assert out.token_ids == logits.argmax(-1).tolist()
    # The tensor builder floors a stray tiny temperature, so even a caller that skipped the rule gets a
    # finite distribution (all its mass on the argmax).
    temp, *rest = sampling_tensors([params], "cpu", 300)
    assert temp.item() == pytest.approx(SAMPLING_EPS)
    probs = warp_probs(logits[:1], temp, *rest)
    assert torch.isfinite(probs).all() and probs[0].argmax() == logits[0].argmax()


def test_a_top_k_beyond_the_vocabulary_is_top_k_off():
    vocab = 300
    logits = torch.randn(3, vocab)
    huge = SamplingParams(temperature=1.0, seed=5)
    huge.top_k = 2**80  # past int64: building the tensor as given would overflow (the API answers 400)
    at_vocab = SamplingParams(temperature=1.0, seed=5, top_k=vocab)
    inside = SamplingParams(temperature=1.0, seed=5, top_k=vocab - 1)
    assert sampling_tensors([huge, at_vocab, inside], "cpu", vocab)[1].tolist() == [0, 0, vocab - 1]
    assert sampling_tensors([huge], "cpu")[1].tolist() == [0]  # no vocabulary given: still no overflow
    off = Sampler()(logits, [_Seq(SamplingParams(temperature=1.0, seed=5)) for _ in range(3)]).token_ids
    assert Sampler()(logits, [_Seq(huge) for _ in range(3)]).token_ids == off


def _mixed_rows():
    """Greedy, seeded sampled (with truncation, penalties and logprobs) and greedy with logprobs."""
    return [
        _Seq(SamplingParams(temperature=0.0), request_id="greedy"),
        _Seq(SamplingParams(temperature=0.9, top_p=0.9, seed=11, repetition_penalty=1.3), prompt=[1, 2, 3],
             request_id="seeded"),
        _Seq(SamplingParams(temperature=0.7, top_k=20, seed=12, logprobs=2), output=[4, 4], request_id="seeded-lp"),
        _Seq(SamplingParams(temperature=0.0, logprobs=3), request_id="greedy-lp"),
    ]


@pytest.mark.parametrize("breakage", ["logprobs", "temperature", "fault"])
def test_a_row_whose_preparation_raises_fails_alone(breakage):
    torch.manual_seed(0)
    logits = torch.randn(5, 400) * 3
    ref = Sampler()(logits[[0, 1, 2, 4]], _mixed_rows())
    rows = _mixed_rows()
    bad = _Seq(SamplingParams(temperature=0.8, seed=13), request_id="bad")
    faults = None
    if breakage == "logprobs":
        bad.params.logprobs = 10**6  # topk past the vocabulary raises
    elif breakage == "temperature":
        bad.params.temperature = "hot"  # the sampling tensor cannot be built
    else:
        faults = FaultInjector()
        faults.arm("bad", "prepare")
    rows.insert(3, bad)
    got = Sampler()(logits, rows, faults)
    assert list(got.errors) == [3] and got.token_ids[3] is None and got.logprobs[3] is None
    others = [0, 1, 2, 4]
    assert [got.token_ids[i] for i in others] == ref.token_ids  # greedy and seeded: the same tokens
    assert [got.logprobs[i] for i in others] == ref.logprobs
    assert not ref.errors


def test_a_batch_failure_no_row_reproduces_is_raised():
    class Flaky(Sampler):
        calls = 0

        def _prepare(self, raw, seqs, faults):
            Flaky.calls += 1
            if Flaky.calls == 1:
                raise RuntimeError("out of memory")
            return super()._prepare(raw, seqs, faults)

    with pytest.raises(RuntimeError, match="out of memory"):
        Flaky()(torch.randn(2, 50), [_Seq(SamplingParams(temperature=0.0)) for _ in range(2)])
