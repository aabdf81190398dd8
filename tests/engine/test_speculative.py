"""Speculative decoding is lossless: greedy token-identical, oracle drafters, KV consistency."""

from __future__ import annotations

import pytest
import torch

from dspark_testing import drive, make_random_drafter
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams
from dspark_serve.engine.speculative import Drafts


def _engine(model, drafter=None, gamma=7, verification="fixed", **kw):
    spec = {"method": "dspark", "model": drafter, "num_speculative_tokens": gamma, "verification": verification,
            "draft_skipping": False} if drafter else None
    cfg = dict(model=model, dtype="float32", num_threads=1, seed=0, speculative_config=spec)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def tiny_pair(tiny_llama_dir, tiny_drafter_dir):
    return tiny_llama_dir, tiny_drafter_dir


def _reqs(n=6, max_tokens=40, **kw):
    return [(f"q{i}", list(range(20 + 3 * i, 40 + 11 * i)), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kw))
            for i in range(n)]


def _replay(continuations: dict, transform=lambda t: t):
    """A drafter stand-in proposing each request's known continuation (after `transform`).

    continuations: prompt token ids (tuple) -> the plain greedy output tokens. The anchor
    is output k-1, so the drafts are outputs k..k+gamma-1 (padded with 0 past the end).
    """

    def propose(seqs, block_size, gamma, choice_rows=()):
        rows = []
        for s in seqs:
            cont = list(continuations[tuple(s.prompt_token_ids)]) + [0] * gamma
            k = s.num_output_tokens
            rows.append([transform(t) for t in cont[k:k + gamma]])
        conf = torch.full((len(seqs), gamma), 10.0)
        return Drafts(torch.tensor(rows), conf, None, conf)

    return propose


def _replay_outputs(ref: dict, reqs, transform=lambda t: t):
    """`_replay` of the plain greedy outputs `ref` ({id: RequestOutput}) of `reqs`."""
    return _replay({tuple(ids): ref[rid].outputs[0].token_ids for rid, ids, _ in reqs}, transform)


def test_oracle_drafter_accepts_everything(tiny_pair, monkeypatch):
    model, drafter = tiny_pair
    reqs = _reqs()
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    monkeypatch.setattr(eng.proposer, "propose", _replay_outputs(ref, reqs))
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    st = eng.stats
    # every round accepts all it verified: tau = l + 1, and l = gamma except where max_tokens caps it
    assert st.spec_num_accepted_tokens == st.spec_num_draft_tokens
    assert st.spec_verify_length_counts.get(4, 0) >= 6 * 6
    assert eng.kv.num_used_blocks == 0


def test_wrong_drafter_accepts_nothing_and_changes_nothing(tiny_pair, monkeypatch):
    model, drafter = tiny_pair
    reqs = _reqs()
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    monkeypatch.setattr(eng.proposer, "propose", _replay_outputs(ref, reqs, lambda t: (t + 1) % 1000))
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    st = eng.stats
    assert st.spec_num_drafts > 0 and st.spec_num_accepted_tokens == 0  # tau = 1 every round


def test_kv_and_drafter_context_equal_a_fresh_prefill(tiny_pair):
    model, drafter = tiny_pair
    eng = _engine(model, drafter, gamma=7)
    eng.add_request("k", params=SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                    prompt_token_ids=list(range(30, 75)))
    for _ in range(25):  # many rounds, with rejections (random drafter)
        eng.step()
    seq = eng.seqs["k"]
    assert eng.stats.spec_num_draft_tokens > eng.stats.spec_num_accepted_tokens  # rejections happened
    n = seq.num_computed_tokens
    assert seq.block_table.num_tokens == n

    def slots(s, count, bs):
        return torch.tensor([s.block_table.blocks[p // bs] * bs + p % bs for p in range(count)])

    bs = eng.kv.block_size
    got_kv = eng.runner.kv[:, :, slots(seq, n, bs)]
    got_ctx = eng.runner.proposer.pool[:, :, slots(seq, n, bs)]
    fresh = _engine(model, drafter, gamma=7)
    fresh.add_request("f", params=SamplingParams(temperature=0, max_tokens=5), prompt_token_ids=seq.token_ids[:n])
    fresh.step()
    fseq = fresh.seqs["f"]
    want_kv = fresh.runner.kv[:, :, slots(fseq, n, bs)]
    want_ctx = fresh.runner.proposer.pool[:, :, slots(fseq, n, bs)]
    torch.testing.assert_close(got_kv, want_kv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got_ctx, want_ctx, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("policy", ["fixed", "scheduled", "async", "threshold"])
def test_greedy_with_random_drafter_is_token_identical_tiny(tiny_pair, policy):
    model, drafter = tiny_pair
    reqs = _reqs(n=8, max_tokens=64)
    ref = drive(_engine(model), reqs)
    got = drive(_engine(model, drafter, gamma=7, verification=policy), reqs, arrivals={0: [0, 1, 2], 3: [3, 4], 9: [5, 6, 7]})
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids


def test_a_context_window_drafts_from_the_last_positions_only_and_stays_lossless(tiny_pair):
    """With draft_context_window W the proposer drafts from the last W context positions: what the
    drafter's pool holds before them does not change a draft; without it, it does. Output is the
    plain greedy output either way."""
    model, drafter = tiny_pair
    gamma, window = 5, 8
    prompt = list(range(30, 75))

    def drafts(eng, corrupt_before=None):
        seq = eng.seqs["w"]
        pool = eng.runner.proposer.pool
        saved = pool.clone()
        if corrupt_before is not None:
            bs = eng.kv.block_size
            slots = torch.tensor([seq.block_table.blocks[p // bs] * bs + p % bs for p in range(corrupt_before)])
            pool[:, :, slots] = torch.randn_like(pool[:, :, slots]) * 10
        d = eng.runner.proposer.propose([seq], eng.kv.block_size, gamma)
        pool.copy_(saved)
        return d

    results = {}
    for w in (window, 0):
        eng = _engine(model, drafter, gamma=gamma, speculative_config={
            "method": "dspark", "model": drafter, "num_speculative_tokens": gamma, "verification": "fixed",
            "draft_skipping": False, "draft_context_window": w})
        assert eng.runner.proposer.drafter.config.draft_context_window == (w or None)
        eng.add_request("w", params=SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                        prompt_token_ids=prompt)
        eng.step()
        n = eng.seqs["w"].num_computed_tokens
        assert n > window
        clean, corrupt = drafts(eng), drafts(eng, corrupt_before=n - window)
        results[w] = torch.equal(clean.tokens, corrupt.tokens) and torch.equal(clean.confidence_logits, corrupt.confidence_logits)
    assert results == {window: True, 0: False}
    reqs = _reqs(n=4, max_tokens=48)
    ref = drive(_engine(model), reqs)
    got = drive(_engine(model, speculative_config={
        "method": "dspark", "model": drafter, "num_speculative_tokens": 7, "verification": "fixed",
        "draft_skipping": False, "draft_context_window": 6}), reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids


def test_stop_inside_an_accepted_run_ends_at_the_right_token(tiny_pair, monkeypatch):
    model, drafter = tiny_pair
    reqs = _reqs(n=1, max_tokens=30)
    ref = drive(_engine(model), reqs)["q0"].outputs[0].token_ids
    stop_tok = ref[10]
    first = ref.index(stop_tok)
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_tok])
    eng = _engine(model, drafter, gamma=7)

    monkeypatch.setattr(eng.proposer, "propose", _replay({tuple(reqs[0][1]): ref}))
    out = drive(eng, [("q0", reqs[0][1], p)])["q0"].outputs[0]
    assert out.token_ids == ref[: first + 1] and out.finish_reason == "stop"
    assert eng.kv.num_used_blocks == 0


def test_speculative_config_errors(tiny_llama_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown speculative_config"):
        _engine(tiny_llama_dir, speculative_config={"method": "dspark", "model": "x", "bogus": 1})
    import json

    bad = make_random_drafter(tiny_llama_dir, tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["target_layer_ids"] = [0, 7]  # the tiny target has 2 layers
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the target"):
        _engine(tiny_llama_dir, bad)
    for bad_window in (-1, 2.5, "64", True):
        with pytest.raises(ValueError, match="draft_context_window"):
            _engine(tiny_llama_dir, speculative_config={"method": "dspark", "model": "x", "draft_context_window": bad_window})
    none = _engine(tiny_llama_dir, speculative_config={"method": "none"})
    assert none.proposer is None


@pytest.mark.parametrize("head_type", ["gated", "rnn"])
def test_every_sequential_head_variant_runs_losslessly(tiny_llama_dir, tmp_path, head_type):
    drafter = make_random_drafter(tiny_llama_dir, tmp_path / head_type, markov_head_type=head_type, markov_rank=8)
    reqs = _reqs(n=3, max_tokens=24)
    ref = drive(_engine(tiny_llama_dir), reqs)
    eng = _engine(tiny_llama_dir, drafter, gamma=5)
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert eng.stats.spec_num_drafts > 0


def test_the_cost_table_holds_the_verify_forward_and_the_plan_adds_the_drafting_seconds(tiny_pair, tmp_path,
                                                                                        monkeypatch):
    """The drafting pass is timed apart: the start-up profile and the live refresh leave it out of
    SPS(B), and every plan gets this step's drafting seconds as `fixed_seconds`."""
    import json
    import time

    from dspark_serve.engine.speculative import DraftProposer

    model, drafter = tiny_pair
    slow = 0.05  # a drafting pass far slower than the tiny target's forward (about a millisecond)
    real = DraftProposer.propose

    def slow_propose(self, *a, **k):
        time.sleep(slow)
        return real(self, *a, **k)

    monkeypatch.setattr(DraftProposer, "propose", slow_propose)
    path = tmp_path / "table.json"
    eng = _engine(model, drafter, gamma=4, verification="scheduled", cost_table=str(path))
    stored = json.loads(path.read_text())
    assert stored["key"]["measures"] == "verify-forward+draft-pass"
    # ... which is profiled apart, by the sequences it drafts for (the draft budget's forecast)
    assert [n for n, _ in stored["draft"]][:3] == [1, 2, 4] and min(sec for _, sec in stored["draft"]) >= slow
    # with the sleeps in, every SPS would be < 1 / slow = 20; the tiny forward at B <= 16 takes a few ms
    assert min(sps for b, sps in stored["points"] if b <= 16) > 1 / slow

    spec = eng.speculative
    fixed, observed = [], []
    plan = spec.policy.plan_with_stats
    monkeypatch.setattr(spec.policy, "plan_with_stats",
                        lambda *a, **k: (fixed.append(k["fixed_seconds"]), plan(*a, **k))[1])
    observe = spec.cost_table.observe
    monkeypatch.setattr(spec.cost_table, "observe", lambda n, s: (observed.append(s), observe(n, s))[1])
    drive(eng, _reqs(n=3, max_tokens=12))
    assert fixed and min(fixed) >= slow
    assert observed and max(observed) < slow  # each drafted step's seconds minus its drafting pass
    assert min(sps for b, sps in eng.speculative.cost_table.points.items() if b <= 16) > 1 / slow


def test_algorithm_1s_batch_counts_the_decodes_that_do_not_draft(tiny_pair, monkeypatch):
    """B = every token of the forward: a decoding request that does not draft this step (penalties
    here) still feeds its one token, and SPS(B) must be read with it."""
    model, drafter = tiny_pair
    eng = _engine(model, drafter, gamma=4)
    seen = []
    real = eng.speculative.policy.plan

    def plan(conf, caps, base_tokens=0):
        seen.append((len(caps), base_tokens))
        return real(conf, caps, base_tokens)

    monkeypatch.setattr(eng.speculative.policy, "plan", plan)
    reqs = [("d0", list(range(20, 40)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
            ("d1", list(range(50, 70)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)),
            ("p", list(range(80, 100)), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                                       repetition_penalty=1.2))]
    drive(eng, reqs)
    # every drafting step had both plain requests drafting and the penalised one decoding beside them
    assert seen and all(base == 1 for n, base in seen if n == 2)
    assert any(n == 2 for n, _ in seen)


def test_a_failing_drafting_pass_decodes_that_step_plainly(tiny_pair, monkeypatch):
    """Drafting is an optimisation: when it raises, the step goes on without drafts and every
    request keeps its exact greedy output (no request pays for it)."""
    model, drafter = tiny_pair
    reqs = _reqs(n=3, max_tokens=12)
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    real = eng.proposer.propose
    calls = [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] % 2:
            raise RuntimeError("injected drafting failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(eng.proposer, "propose", flaky)
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].finish_reason == "length"
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert eng.speculative.draft_failures >= 1 and eng.stats.spec_num_drafts > 0
    assert eng.kv.num_used_blocks == 0


@pytest.mark.parametrize("curve,pays", [({1: 1.0, 64: 1.0}, True), ({1: 100.0, 3: 100.0, 4: 1.0}, False)])
def test_load_aware_drafting_stops_drafting_where_it_does_not_pay(tiny_pair, monkeypatch, curve, pays):
    """Before drafting, the step asks the budget how many positions to draft, from the last steps:
    where verifying any draft costs more than it brings (SPS falls 100x past the 3 requests' B), it soon
    decodes plainly, probing now and then; where drafting pays (an oracle drafter, a flat SPS), it
    drafts every step. Greedy output is plain decoding's either way."""
    from dspark_serve.scheduler import CostTable, DraftBudget, PrefixScheduler

    model, drafter = tiny_pair
    reqs = _reqs(n=3, max_tokens=40)
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    spec = eng.speculative
    spec.cost_table = CostTable.from_points(curve)
    monkeypatch.setattr(spec.cost_table, "observe", lambda n, s: None)  # keep the curve as given
    spec.policy = PrefixScheduler(spec.cost_table)
    spec.budget = DraftBudget(4)
    if pays:  # drafts that are all accepted, drafted in no time: drafting pays at any flat SPS
        monkeypatch.setattr(eng.proposer, "propose", _replay_outputs(ref, reqs))
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    st = eng.stats
    per_step = st.spec_num_proposed_tokens / st.spec_num_decode_steps
    # the /metrics counters: steps kept plain, drafted steps, verdicts (one per drafted step judged)
    assert st.spec_budget_plain_steps == spec.budget.plain_steps
    verdicts = st.spec_budget_verdicts
    assert 0 < sum(verdicts.values()) <= st.spec_drafted_steps < st.steps
    if pays:
        # one plain step measures the alternative (the first verdict had only the profile to price it)
        assert spec.budget.plain_steps <= 1 and per_step > 2.0
        assert verdicts.get("lost", 0) == 0
    else:
        assert spec.budget.plain_steps > 0.6 * st.steps and per_step < 1.0
        assert verdicts["lost"] > verdicts.get("paid", 0)


def test_a_drafted_step_is_judged_against_measured_plain_steps_not_the_profile(tiny_pair, monkeypatch):
    """The profile says verifying is free (flat SPS) and every draft is accepted, but on this
    machine a forward that verifies drafts takes 40 ms more than a plain one (a verification block
    of B tokens costs more than B decodes). Judged by the profile, drafting paid every step; judged
    by the whole step against measured plain steps, 3 requests x 5 tokens in 40 ms lose to 3 tokens
    in a few ms, and the budget backs off. Greedy output is plain decoding's either way."""
    import time as _time

    from dspark_serve.scheduler import CostTable, DraftBudget, DraftedSteps, PlainSteps, PrefixScheduler

    model, drafter = tiny_pair
    reqs = _reqs(n=3, max_tokens=120)
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    spec = eng.speculative
    spec.cost_table = CostTable.from_points({1: 1.0, 64: 1.0})
    monkeypatch.setattr(spec.cost_table, "observe", lambda n, s: None)  # keep the curve as given
    spec.policy = PrefixScheduler(spec.cost_table)
    spec.budget, spec._plain_steps, spec._drafted_steps = DraftBudget(4), PlainSteps(), DraftedSteps()
    monkeypatch.setattr(eng.proposer, "propose", _replay_outputs(ref, reqs))
    real = eng.runner.execute

    def execute(rows):
        if any(r.draft for r in rows):
            _time.sleep(0.04)
        return real(rows)

    monkeypatch.setattr(eng.runner, "execute", execute)
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert spec.budget.plain_steps > 0.6 * eng.stats.steps


@pytest.mark.parametrize("history", [True, False])
def test_a_drafted_step_is_judged_by_the_acceptance_seen_not_its_own_luck(tiny_pair, monkeypatch, history):
    """Three requests verify 4 drafts each and this step accepts none of them, while the rounds
    before accepted almost everything. Judged by what its verified lengths yield at the acceptance
    seen (about 13 tokens for 3), the step paid: 10 ms beyond a measured 10 ms plain step of 3
    tokens buys about 10 extra tokens at 3.3 ms each. Judged by its own 3 tokens (too few rounds
    seen yet: the mutation), it lost."""
    from types import SimpleNamespace

    from dspark_serve.scheduler import CostTable, DraftBudget, DraftedSteps, DraftForecast, PlainSteps, PrefixScheduler

    model, drafter = tiny_pair
    spec = _engine(model, drafter, gamma=4).speculative
    spec.cost_table = CostTable.from_points({1: 1.0, 64: 1.0}, draft={1: 0.004})
    monkeypatch.setattr(spec.cost_table, "observe", lambda n, s: None)
    monkeypatch.setattr(spec.cost_table, "observe_draft", lambda n, s: None)
    spec.policy = PrefixScheduler(spec.cost_table)
    spec.forecast = DraftForecast(4, spec.cost_table, min_rounds=10 if history else 10**6)
    spec.budget, spec._plain_steps, spec._drafted_steps = DraftBudget(4), PlainSteps(), DraftedSteps()
    for _ in range(30):
        spec.forecast.record(4, 4)
    spec._plain_steps.observe(3, 0.010)  # a measured plain step of the same 3 rows
    # one drafted step: 3 rows verify 4 drafts each; 4 ms drafting, a 12 ms forward, 20 ms in all
    spec._verdict = {"r": 3, "batch": 3, "base": 0, "prefill": 0, "other": 0, "tokens": 15, "longest": 4,
                     "undrafted": 0}
    spec._drafted, spec._expected, spec._draft_seconds = True, 0.0, 0.004
    spec.stats.spec_last_realised_tokens = 0
    spec.observe_step(15, 0.016)
    for i in range(3):
        spec.record_round(SimpleNamespace(request_id=f"r{i}"), 4, 0, {"lookup": 0, "logits": None})
    # each round's expectation is taken before it is recorded: about 4.9, 4.9 and 4.8 tokens
    assert 13.0 < spec._expected < 15.0 and spec.stats.spec_last_realised_tokens == 3
    assert spec.forecast.expected_tokens(0) == 1.0
    spec.end_step(15, 0.020)
    assert spec.stats.spec_budget_verdicts == ({"paid": 1} if history else {"lost": 1})
    assert spec.budget.positions(3) == (4 if history else 0)  # a loss backs off


def test_greedy_and_sampled_rounds_have_calibrators_of_their_own(tiny_pair):
    """A greedy round accepts a draft when it is the argmax, a sampled one with probability
    min(1, p/q): each acceptance rule is calibrated on its own rounds and applied to its own rows."""
    from types import SimpleNamespace

    from dspark_serve.scheduler import STSCalibrator

    model, drafter = tiny_pair
    spec_cfg = {"method": "dspark", "model": drafter, "num_speculative_tokens": 4, "verification": "fixed",
                "draft_skipping": False, "online_calibration": True, "prompt_lookup_max": 0}
    eng = LLMEngine(EngineConfig(model=model, dtype="float32", num_threads=1, seed=0, speculative_config=spec_cfg))
    online = eng.speculative.online
    drive(eng, _reqs(n=2, max_tokens=12))
    assert online["greedy"].num_recorded > 0 and online["sampled"].num_recorded == 0
    sampled = [(f"s{i}", ids, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True))  # unseeded: they draft
               for i, (_, ids, _) in enumerate(_reqs(n=2))]
    drive(eng, sampled)
    assert online["sampled"].num_recorded > 0
    online["greedy"]._calibrator = STSCalibrator([1.0] * 4)
    online["sampled"]._calibrator = STSCalibrator([10.0] * 4)
    logits = torch.full((2, 4), 3.0)
    rows = [SimpleNamespace(params=SamplingParams(temperature=0)), SimpleNamespace(params=SamplingParams(temperature=1.0))]
    conf = eng.speculative.confidences(logits, rows)
    assert torch.allclose(conf[0], torch.sigmoid(torch.tensor(3.0)).expand(4))
    assert torch.allclose(conf[1], torch.sigmoid(torch.tensor(0.3)).expand(4))


def test_verification_slots_never_take_the_token_budget_a_prefill_needs(tiny_pair, monkeypatch):
    """Verification rows go after prefill: while prompts wait (or are mid-prefill) for more of the
    step's token budget than the decodes leave, the step drafts nothing, so a first token is never
    delayed by drafts; once the prompt is in, drafting resumes. Greedy output is unchanged."""
    model, drafter = tiny_pair
    reqs = [("a", list(range(20, 40)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            ("b", list(range(60, 80)), SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
            ("long", list(range(100, 160)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
    arrivals = {0: [0, 1], 3: [2]}
    ref = drive(_engine(model, max_num_batched_tokens=48), reqs, arrivals)
    eng = _engine(model, drafter, gamma=4, max_num_batched_tokens=48)
    steps = []
    real = eng.speculative.caps

    def caps(running, waiting=(), token_budget=None, max_num_seqs=None):
        out = real(running, waiting, token_budget, max_num_seqs)
        prefill = sum(s.num_pending_tokens for s in list(running) + list(waiting) if s.num_pending_tokens > 1)
        decodes = sum(1 for s in running if s.num_pending_tokens == 1)
        steps.append((prefill, decodes, sum(out.values())))
        return out

    monkeypatch.setattr(eng.speculative, "caps", caps)
    got = drive(eng, reqs, arrivals)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert all(slots == 0 or prefill + decodes + slots <= 48 for prefill, decodes, slots in steps)
    assert any(prefill > 0 and slots == 0 for prefill, _, slots in steps)  # the 60-token prompt's steps
    assert any(prefill == 0 and slots > 0 for prefill, _, slots in steps)  # drafting before and after it


def test_the_forecast_keeps_steps_plain_where_no_acceptance_seen_pays_for_drafting(tiny_pair, monkeypatch):
    """Every verification round reaches the draft budget's forecast; once it has seen enough, a
    drafting pass priced far above what any accepted draft brings keeps the steps plain without
    probes (counted for /metrics), and greedy output is plain decoding's."""
    from dspark_serve.scheduler import CostTable, DraftBudget, DraftForecast, PrefixScheduler

    model, drafter = tiny_pair
    reqs = _reqs(n=3, max_tokens=40)
    ref = drive(_engine(model), reqs)
    eng = _engine(model, drafter, gamma=4)
    spec = eng.speculative
    spec.cost_table = CostTable.from_points({1: 1.0, 64: 1.0}, draft={1: 10.0})  # a 10 s drafting pass
    monkeypatch.setattr(spec.cost_table, "observe", lambda n, s: None)  # keep the table as given
    monkeypatch.setattr(spec.cost_table, "observe_draft", lambda n, s: None)
    spec.policy = PrefixScheduler(spec.cost_table)
    spec.forecast = DraftForecast(4, spec.cost_table, min_rounds=3)
    spec.budget = DraftBudget(4, forecast=spec.forecast.may_pay)
    # the forecast alone: the steps' measured milliseconds (not the table's 10 s) could make a
    # verdict pay, and a paid level bypasses the forecast
    monkeypatch.setattr(spec._drafted_steps, "record", lambda *a, **k: False)
    got = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    st = eng.stats
    assert spec.forecast.rounds == st.spec_num_drafts >= 3
    assert st.spec_budget_forecast_steps == spec.budget.forecast_steps > 0.6 * st.steps
    assert st.spec_drafted_steps <= 3  # the steps before the forecast had its history
