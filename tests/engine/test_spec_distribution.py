"""Sampled output with speculation follows the target's own distribution (toy vocabulary, chi-square).

A toy target (8-token vocabulary, peaky random weights) and a random drafter
that disagrees with it strongly. Thousands of seeded requests generate a few
tokens each; the empirical joint distribution of output tokens 2 and 3 (the
first ones produced by verification rounds) is compared with the exact one,
computed by enumerating every prefix through the target.

The "compete" cases give the drafter a confidence head that reads only the
previous draft token (c_k near 0 or 1 depending on x_{k-1}) and the context
lookup a fixed middling acceptance, so the choice between the two sources
flips with what the drafter samples: a choice that reads the sampled draft's
confidences is caught here (the mutation test at the end).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

import dspark_serve.engine.engine as engine_mod
import dspark_serve.engine.speculative as spec_mod
from dspark_testing import make_random_drafter, make_tiny_model
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams
from dspark_serve.engine.lookup import LookupStats
from dspark_serve.engine.sampler import warp_probs
from dspark_serve.models.attention import AttentionMetadata

VOCAB = 8
PROMPT = [3, 5, 2, 7, 4]
N = 2500


def _toy_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1")


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("toy-target")
    make_tiny_model(path, "llama", _toy_tokenizer(), vocab_size=VOCAB, num_hidden_layers=2, hidden_size=32,
                    intermediate_size=64, num_attention_heads=2, num_key_value_heads=1, eos_token_id=1)
    # Peaky but not degenerate distributions: scale the final norm.
    f = next(path.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 6.0
    save_file(sd, str(f), metadata={"format": "pt"})
    dpath = tmp_path_factory.mktemp("toy-drafter")
    make_random_drafter(str(path), dpath, seed=5, block_size=7, markov_rank=8, mask_token_id=0)
    sd = load_file(str(dpath / "model.safetensors"))
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], 8.0)
    sd["markov_head.markov_w2.weight"] = sd["markov_head.markov_w2.weight"] * 4.0
    save_file(sd, str(dpath / "model.safetensors"), metadata={"format": "pt"})
    # The same drafter over a restricted draft vocabulary (FR-Spec style): only 5 of the 8 tokens
    # can be drafted, so the draft distribution puts zero mass on the others.
    rpath = tmp_path_factory.mktemp("toy-drafter-restricted")
    make_random_drafter(str(path), rpath, seed=5, block_size=7, markov_rank=8, mask_token_id=0, draft_vocab_size=5)
    sd = load_file(str(rpath / "model.safetensors"))
    sd["d2t"] = torch.tensor([0, 2, 3, 5, 6])
    sd["norm.weight"] = torch.full_like(sd["norm.weight"], 8.0)
    sd["markov_head.markov_w2.weight"] = sd["markov_head.markov_w2.weight"] * 4.0
    save_file(sd, str(rpath / "model.safetensors"), metadata={"format": "pt"})
    # The drafter whose confidences depend on the previous draft token above all.
    cpath = tmp_path_factory.mktemp("toy-drafter-markov-confidence")
    make_random_drafter(str(path), cpath, seed=5, block_size=7, markov_rank=8, mask_token_id=0)
    sd = load_file(str(cpath / "model.safetensors"))
    # draft distributions spread over several tokens (a peaky one would leave the choice nothing to bias)
    sd["norm.weight"] = torch.ones_like(sd["norm.weight"])
    # confidence logit +6 after an even token, -6 after an odd one (h is ignored): solve for the
    # weights on the Markov feature W1[x_{k-1}] ([VOCAB, rank 8], invertible)
    w = sd["confidence_head.proj.weight"]
    w1 = sd["markov_head.markov_w1.weight"].double()
    hidden = w.shape[1] - w1.shape[1]
    want = torch.tensor([6.0 if v % 2 == 0 else -6.0 for v in range(VOCAB)], dtype=torch.float64)
    w[:, :hidden] = 0.0
    w[0, hidden:] = torch.linalg.solve(w1, want).to(w.dtype)
    sd["confidence_head.proj.weight"] = w
    sd["confidence_head.proj.bias"] = torch.zeros_like(sd["confidence_head.proj.bias"])
    save_file(sd, str(cpath / "model.safetensors"), metadata={"format": "pt"})
    return str(path), str(dpath), str(rpath), str(cpath)


def _exact_joint(engine, top_p, temperature=1.0):
    """P(t2, t3) under the target's own (warped) sampling, by enumerating t1, t2."""
    model = engine.runner.model
    cfg = model.config

    def dist(prefixes):
        n = len(prefixes)
        L = len(prefixes[0])
        blocks_per = -(-L // 16)
        pool = [(torch.zeros(n * blocks_per * 16, cfg.num_kv_heads, cfg.head_dim),
                 torch.zeros(n * blocks_per * 16, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
        tables = [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(n)]
        meta = AttentionMetadata([L] * n, [L] * n, tables, 16)
        ids = torch.tensor([t for p in prefixes for t in p])
        rows = torch.arange(n) * L + L - 1
        logits, _ = model(ids, meta.positions(), meta, pool, logits_indices=rows)
        one = torch.ones(n)
        return warp_probs(logits.float(), one * temperature, torch.zeros(n, dtype=torch.long), one * top_p, one * 0)

    p1 = dist([PROMPT])[0]
    p2 = dist([PROMPT + [a] for a in range(VOCAB)])  # [a, b]
    pairs = list(itertools.product(range(VOCAB), range(VOCAB)))
    p3 = dist([PROMPT + [a, b] for a, b in pairs]).view(VOCAB, VOCAB, VOCAB)  # [a, b, c]
    joint = torch.einsum("a,ab,abc->bc", p1, p2, p3)
    return joint.flatten().double()


def _empirical(engine, gamma, top_p, temperature=1.0):
    params = [SamplingParams(temperature=temperature, top_p=top_p, seed=i, max_tokens=gamma + 2, ignore_eos=True) for i in range(N)]
    for i, p in enumerate(params):
        engine.add_request(f"s{i}", params=p, prompt_token_ids=PROMPT)
    return _count_pairs(engine)


def _count_pairs(engine):
    """Run the engine dry; counts of (output token 2, output token 3) over the finished requests."""
    counts = torch.zeros(VOCAB * VOCAB, dtype=torch.float64)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                t = out.outputs[0].token_ids
                counts[t[1] * VOCAB + t[2]] += 1
    return counts


def _pvalue(counts, probs):
    expected = probs * counts.sum()
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    exp = torch.cat([expected[big], expected[~big].sum().view(1)])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue


def _engine(toy, gamma, policy="fixed", restricted=False, lookup="auto"):
    """lookup: "auto" (the default choice between drafter and context), "always" (every round with a
    context match verifies the copied draft: point-mass draft distributions), "compete" (the drafter
    whose confidences follow its previous token against a lookup of fixed acceptance 0.6 per position,
    which promises 1.45 tokens: the drafter's draft wins when c_1 and c_2 are near 1), "off"."""
    target, drafter, restricted_drafter, markov_conf_drafter = toy
    drafter = restricted_drafter if restricted else drafter
    if lookup == "compete":
        drafter = markov_conf_drafter
    eng = LLMEngine(EngineConfig(model=target, dtype="float32", num_threads=1, max_num_seqs=256,
                                 max_num_batched_tokens=4096, speculative_config={
                                     "method": "dspark", "model": drafter, "num_speculative_tokens": gamma,
                                     "verification": policy, "draft_skipping": False,
                                     "reproducible_seeds": False, "prompt_lookup_max": 0 if lookup == "off" else 8,
                                     "online_calibration": lookup != "compete"}))
    if lookup == "always":
        eng.speculative.lookup = LookupStats(8, gamma, prior=0.999, prior_weight=1e9)
    if lookup == "compete":
        eng.speculative.lookup = LookupStats(8, gamma, prior=0.6, prior_weight=1e9)
    return eng


@pytest.mark.parametrize("gamma,top_p,policy,restricted,lookup", [
    (1, 1.0, "fixed", False, "off"), (3, 1.0, "fixed", False, "off"), (7, 1.0, "fixed", False, "off"),
    (7, 0.8, "fixed", False, "auto"), (7, 1.0, "scheduled", False, "auto"), (7, 1.0, "async", False, "auto"),
    (7, 1.0, "fixed", True, "auto"), (7, 1.0, "fixed", False, "always"), (3, 0.8, "fixed", True, "always")])
def test_sampled_output_matches_target_distribution(toy, gamma, top_p, policy, restricted, lookup):
    eng = _engine(toy, gamma, policy, restricted, lookup)
    counts = _empirical(eng, gamma, top_p)
    st = eng.stats
    if lookup == "always":  # most rounds verified a copied draft (a match exists unless t1 is new)
        assert st.spec_lookup_num_drafts > 0.5 * st.spec_num_drafts
    elif lookup == "off":
        assert st.spec_lookup_num_drafts == 0
    # the drafter disagrees strongly: many rejections, yet some acceptances
    assert 0 < st.spec_num_accepted_tokens < 0.8 * st.spec_num_draft_tokens
    pv = _pvalue(counts, _exact_joint(eng, top_p))
    assert pv > 0.01


@pytest.mark.parametrize("temperature", [0.7, 1.0])
def test_sampled_output_is_exact_where_lookup_competes_with_markov_confidences(toy, temperature):
    eng = _engine(toy, 7, lookup="compete")
    counts = _empirical(eng, 7, 1.0, temperature)
    st = eng.stats
    # both sources verified often: the choice really flips between them
    assert 0.1 * st.spec_num_drafts < st.spec_lookup_num_drafts < 0.9 * st.spec_num_drafts
    assert _pvalue(counts, _exact_joint(eng, 1.0, temperature)) > 0.01


def test_the_check_has_power_a_choice_reading_the_sampled_draft_is_caught(toy, monkeypatch):
    """Issue 28's defect, put back: the source choice reads the confidences of the tokens the drafter
    sampled instead of its argmax path's. The chi-square test above must see the bias."""
    real = spec_mod.DraftProposer.propose

    def sampled_path_choice(self, *args, **kwargs):
        d = real(self, *args, **kwargs)
        d.choice_logits = d.confidence_logits
        return d

    monkeypatch.setattr(spec_mod.DraftProposer, "propose", sampled_path_choice)
    eng = _engine(toy, 7, lookup="compete")
    counts = _empirical(eng, 7, 1.0)
    assert _pvalue(counts, _exact_joint(eng, 1.0)) < 1e-3


def test_the_check_has_power_accepting_every_draft_is_caught(toy, monkeypatch):
    """A verifier that accepts every draft outputs the drafter's distribution: the test must see it."""

    def accept_all(params, logits, draft_tokens, draft_probs, generator):
        return len(draft_tokens), int(torch.multinomial(torch.softmax(logits[-1].float(), -1), 1, generator=generator))

    monkeypatch.setattr(engine_mod, "verify", accept_all)
    eng = _engine(toy, 3)
    counts = _empirical(eng, 3, 1.0)
    assert _pvalue(counts, _exact_joint(eng, 1.0)) < 1e-3


# ---------------------------------------------------------------- structured outputs (a toy grammar)

class _ToyGrammar:
    """A regular language over token ids, the interface of engine.structured.GrammarMatcher: after
    token t only ALLOWED[t] may follow (the first output token: ALLOWED[PROMPT[-1]]). `accept`
    takes any token (a masking bug then shows up as a biased distribution, not as a failure)."""

    ALLOWED = {t: {(t + 1) % VOCAB, (t + 3) % VOCAB, (t + 4) % VOCAB, (t + 6) % VOCAB} for t in range(VOCAB)}

    def __init__(self):
        self.history = [PROMPT[-1]]

    def _mask(self, last: int, out: torch.Tensor) -> None:
        out.zero_()
        out[sorted(self.ALLOWED[last])] = True

    def fill_mask(self, out):
        self._mask(self.history[-1], out)
        return out

    def allows(self, token: int) -> bool:
        return True  # like accept: the toy's matcher takes any token, only its mask restricts

    def accept(self, token: int) -> bool:
        self.history.append(int(token))
        return True

    def rollback(self, n: int) -> None:
        del self.history[len(self.history) - n:]

    def masks_along(self, tokens, out) -> int:
        last = self.history[-1]
        for j, t in enumerate(tokens):
            self._mask(last, out[j])
            if t not in self.ALLOWED[last]:
                return j
            last = t
        self._mask(last, out[len(tokens)])
        return len(tokens)

    def is_terminated(self) -> bool:
        return False


class _ForcingToyGrammar(_ToyGrammar):
    """As above, but after a token divisible by 3 exactly one token may follow: the drafter drafts
    it as a point mass (a forced token) and the plan counts it as certain."""

    ALLOWED = {t: ({(t + 2) % VOCAB} if t % 3 == 0 else _ToyGrammar.ALLOWED[t]) for t in range(VOCAB)}


def _grammar_joint(engine, grammar=_ToyGrammar):
    """P(t2, t3) under the target's distribution masked by the toy grammar, by enumeration."""
    model = engine.runner.model
    cfg = model.config

    def logits_of(prefixes):
        n, L = len(prefixes), len(prefixes[0])
        blocks_per = -(-L // 16)
        pool = [(torch.zeros(n * blocks_per * 16, cfg.num_kv_heads, cfg.head_dim),
                 torch.zeros(n * blocks_per * 16, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
        meta = AttentionMetadata([L] * n, [L] * n, [list(range(i * blocks_per, (i + 1) * blocks_per)) for i in range(n)], 16)
        logits, _ = model(torch.tensor([t for p in prefixes for t in p]), meta.positions(), meta, pool,
                          logits_indices=torch.arange(n) * L + L - 1)
        return logits.float()

    def masked(logits, lasts):
        allowed = torch.zeros(len(lasts), VOCAB, dtype=torch.bool)
        for i, t in enumerate(lasts):
            allowed[i, sorted(grammar.ALLOWED[t])] = True
        return logits.masked_fill(~allowed, float("-inf")).softmax(-1)

    p1 = masked(logits_of([PROMPT]), [PROMPT[-1]])[0]
    p2 = masked(logits_of([PROMPT + [a] for a in range(VOCAB)]), list(range(VOCAB)))
    pairs = list(itertools.product(range(VOCAB), range(VOCAB)))
    p3 = masked(logits_of([PROMPT + [a, b] for a, b in pairs]), [b for _, b in pairs]).view(VOCAB, VOCAB, VOCAB)
    return torch.einsum("a,ab,abc->bc", p1, p2, p3).flatten().double()


def _grammar_empirical(engine, gamma, grammar=_ToyGrammar):
    for i in range(N):
        # seeds of their own (10000 + i): the runs above draw with seeds 0..N-1
        seq = engine.add_request(f"g{i}", params=SamplingParams(seed=10000 + i, max_tokens=gamma + 2, ignore_eos=True),
                                 prompt_token_ids=PROMPT)
        seq.grammar = grammar()
    return _count_pairs(engine)


@pytest.mark.parametrize("policy,grammar", [("fixed", _ToyGrammar), ("scheduled", _ForcingToyGrammar)])
def test_sampled_output_follows_the_grammar_masked_target(toy, policy, grammar):
    """Structured outputs under speculation: the drafter drafts under the grammar (masked draft
    distributions, the grammar advanced along the draft and rolled back), and verification compares
    the masked target with the masked draft: the output follows the target distribution masked by
    the grammar, exactly. (Sampled constrained requests take no context copies; greedy ones do,
    cut where they leave the grammar: tests/engine/test_structured_engine.py.)"""
    eng = _engine(toy, 7, policy=policy)
    counts = _grammar_empirical(eng, 7, grammar)
    st = eng.stats
    assert st.grammar_mask_rows > N and 0 < st.spec_num_accepted_tokens < st.spec_num_draft_tokens
    exact = _grammar_joint(eng, grammar)
    assert counts[exact == 0].sum() == 0  # nothing outside the grammar
    assert _pvalue(counts, exact) > 0.01


def test_the_check_has_power_an_unmasked_target_is_caught(toy, monkeypatch):
    """The grammar test above must see a target that is not masked (drafts still are)."""
    monkeypatch.setattr(engine_mod, "apply_mask", lambda logits, mask: logits)
    eng = _engine(toy, 7, lookup="off")
    counts = _grammar_empirical(eng, 7)
    assert _pvalue(counts, _grammar_joint(eng)) < 1e-3
