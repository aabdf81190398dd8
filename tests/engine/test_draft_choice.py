"""The choice between the drafter's draft and a copied one is lossless for sampled requests.

Issue 28's worked example, computed by exact enumeration through the engine's own code: the real
`SpeculativeDecoder.draft` (drafter pass, context lookup, the source choice, the plan) over a real
DSparkDrafter whose weights give the example's numbers, then the real acceptance rule and residual
of `engine.speculative`. Only the random draws are replaced: every draft outcome is enumerated with
the probability the drafter gave it.

Vocabulary {A, B, C}; the anchor is C. Target p = (0.7, 0.3, 0) at the first position; the drafter
drafts from {A, B} only, q = (0.5, 0.5); c_1 = 0.8, c_2 = 0.9 after A and 0 after B; the copied
draft (the context "C A C" continues with A) has measured confidences (0.9, 0.5); cap 2. A choice
that reads the sampled draft's confidences keeps the drafter's draft only when x_1 = A, and the first
emitted token is A with probability 0.85; the target says 0.7.
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

import dspark_serve.engine.speculative as spec_mod
from dspark_serve.engine.batcher import StepRow
from dspark_serve.engine.engine import EngineStats
from dspark_serve.engine.lookup import LookupStats
from dspark_serve.engine.sampling_params import SamplingParams
from dspark_serve.engine.speculative import (DraftProposer, SpecConfig, SpeculativeDecoder, acceptance_probability,
                                             residual_distribution)
from dspark_serve.models.config import ModelConfig
from dspark_serve.models.dspark import DSparkDrafter, random_drafter_config
from dspark_serve.models.llama import LlamaForCausalLM

A, B, C = 0, 1, 2
P_TARGET = torch.tensor([0.7, 0.3, 0.0], dtype=torch.float64)


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _decoder(lookup_conf=(0.9, 0.5)):
    cfg = ModelConfig.from_hf(LlamaConfig(vocab_size=3, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                          max_position_embeddings=64))
    target = LlamaForCausalLM(cfg)
    dcfg = random_drafter_config(cfg, block_size=2, markov_rank=4, mask_token_id=C, draft_vocab_size=2)
    drafter = DSparkDrafter(dcfg)
    with torch.no_grad():
        target.embed_tokens.weight[:2] = 0.0  # the draft head's rows: base logits 0, q = (0.5, 0.5)
        drafter.markov_head.markov_w2.weight.zero_()  # no Markov bias: q stays uniform
        w1 = drafter.markov_head.markov_w1.weight
        w1.zero_()
        # the confidence head reads W1[x_{k-1}] (first feature) only
        w1[C, 0], w1[A, 0], w1[B, 0] = _logit(0.8), _logit(0.9), -60.0
        proj = drafter.confidence_head.proj
        proj.weight.zero_()
        proj.bias.zero_()
        proj.weight[0, dcfg.hidden_size] = 1.0
    drafter.attach_target(target)
    proposer = DraftProposer(drafter, num_slots=64, dtype=torch.float32, device=torch.device("cpu"), gamma=2)
    spec = SpecConfig(method="dspark", num_speculative_tokens=2, verification="fixed", draft_skipping=False,
                      online_calibration=False)
    dec = SpeculativeDecoder(spec, proposer, 2, EngineStats(), max_model_len=64)
    dec.lookup = LookupStats(spec.prompt_lookup_max, 2)
    dec.lookup.accepted[1, 1] = lookup_conf  # sampled requests, match length 1
    dec.lookup.judged[1, 1] = 1.0
    return dec


def _request():
    tokens = [C, A, C]  # the last C occurred before, followed by A: the copied draft is [A, C]
    return SimpleNamespace(request_id="r", token_ids=tokens, num_computed_tokens=len(tokens) - 1,
                           num_pending_tokens=1, block_table=SimpleNamespace(blocks=[0]),
                           params=SamplingParams(temperature=1.0, max_tokens=None), generator=None)


def _p_first_token(dec, monkeypatch) -> tuple[np.ndarray, int]:
    """P(first emitted token) by enumerating every draft (x_1, x_2) and both acceptance outcomes of x_1;
    also returns how many of the draft outcomes verified the copied draft."""
    dist = np.zeros(3)
    copied = 0
    for outcome in itertools.product((A, B), repeat=2):
        weight = [1.0]

        def draw(probs, generators, outcome=outcome):
            k = draw.calls
            draw.calls += 1
            weight[0] *= float(probs[0, outcome[k]])  # the probability the drafter gave this draft
            return torch.tensor([outcome[k]])

        draw.calls = 0
        monkeypatch.setattr(spec_mod, "_draw", draw)
        seq = _request()
        row = StepRow(seq, 3, 1)
        dec.draft([row], block_size=16)
        tokens, q = row.draft, row.draft_info["probs"]
        copied += bool(row.draft_info["lookup"])
        x1 = tokens[0]
        accept = acceptance_probability(float(P_TARGET[x1]), float(q[0, x1]))
        dist[x1] += weight[0] * accept
        dist += weight[0] * (1 - accept) * residual_distribution(P_TARGET, q[0, :3]).numpy()
    return dist, copied


def test_the_choice_between_drafter_and_copy_leaves_the_first_token_exact(monkeypatch):
    dist, copied = _p_first_token(_decoder(), monkeypatch)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12)
    assert dist[A] == pytest.approx(0.7, abs=1e-9)
    assert dist[B] == pytest.approx(0.3, abs=1e-9)
    assert copied == 0  # along its argmax path (A, then c_2 = 0.9) the drafter promises 1.52 > 1.35


def test_exact_when_the_copy_wins_too(monkeypatch):
    dist, copied = _p_first_token(_decoder(lookup_conf=(0.99, 0.99)), monkeypatch)
    assert copied == 4  # every draft outcome verified the copied draft
    assert dist[A] == pytest.approx(0.7, abs=1e-9)


def test_mutation_the_old_rule_reading_the_sampled_draft_gives_0_85(monkeypatch):
    """The rule before the fix compared the confidences of the SAMPLED draft; the enumeration sees
    its bias, so the tests above have the power to catch it."""
    real = DraftProposer.propose

    def sampled_path_choice(self, *args, **kwargs):
        d = real(self, *args, **kwargs)
        d.choice_logits = d.confidence_logits
        return d

    monkeypatch.setattr(DraftProposer, "propose", sampled_path_choice)
    dist, copied = _p_first_token(_decoder(), monkeypatch)
    assert copied == 2  # the drafter's draft survives only when x_1 = A
    assert dist[A] == pytest.approx(0.85, abs=1e-9)


def test_greedy_rows_choose_on_their_drafted_path():
    """A greedy row's drafted path is its argmax path: the choice reads the same confidences as the
    plan, as before the fix (greedy output and tau unchanged)."""
    dec = _decoder()
    seq = _request()
    seq.params = SamplingParams(temperature=0.0, max_tokens=None)
    d = dec.proposer.propose([seq], 16, 2, choice_rows=[0])
    assert torch.equal(d.choice_logits, d.confidence_logits)
    assert d.tokens[0].tolist() == [A, A]  # argmax ties go to the first token
