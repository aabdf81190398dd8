"""Speed floors in the engine (tiny random-weight models): admission held under a fixed step model,
floor weights in the plan with greedy output unchanged, priorities, outcomes counted."""

from __future__ import annotations

import random

import pytest

from dspark_testing import drive
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, SamplingParamsError
from dspark_serve.scheduler import CostTable


def _engine(tiny, drafter, tmp_path, spec=None, **kw):
    spec = {"method": "dspark", "model": drafter, "num_speculative_tokens": 4, **(spec or {})}
    return LLMEngine(EngineConfig(model=tiny, dtype="float32", num_threads=1, seed=0, enforce_eager=True,
                                  cost_table=str(tmp_path / "table.json"), speculative_config=spec, **kw))


def _requests(n, max_tokens=24, seed=0, **params):
    rng = random.Random(seed)
    return [(f"r{i}", [rng.randrange(3, 2000) for _ in range(rng.randint(4, 30))],
             SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params)) for i in range(n)]


def test_admission_holds_at_the_predicted_capacity(tiny_llama_dir, tiny_drafter_dir, tmp_path):
    eng = _engine(tiny_llama_dir, tiny_drafter_dir, tmp_path, sla_min_tokens_per_s=30.0)
    # a fixed step model: 10 ms per forward token, one token per request per step, so the predicted
    # speed with R requests is 100 / R tok/s and a floor of 30 fits 3 at once
    table = eng.speculative.cost_table
    table.replace(CostTable.from_points({b: 100.0 / b for b in (1, 2, 4, 8, 16, 32, 64)}))
    table.observe = lambda *a, **k: None  # (live timings of the tiny model would correct it)
    f = eng.floors
    f.observe_step = lambda *a, **k: None
    f.tokens_per_request, f.fed_per_request, f.overhead = 1.0, 1.0, 1.0
    reqs = _requests(7, max_tokens=12)
    for rid, ids, p in reqs:
        eng.add_request(rid, params=p, prompt_token_ids=ids)
    most = 0
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        most = max(most, eng.num_running)
    assert most == 3  # held at the capacity the floor allows, then refilled as requests finished
    assert len(done) == 7 and all(len(o.outputs[0].token_ids) == 12 for o in done.values())
    assert f.admission_holds > 0
    assert eng._admissions() is None  # nothing waiting: no limit


def test_without_a_server_floor_nothing_is_held(tiny_llama_dir, tiny_drafter_dir, tmp_path):
    """Requests' own floors weigh in the plan but hold the queue only up to the server's floor."""
    eng = _engine(tiny_llama_dir, tiny_drafter_dir, tmp_path)
    for rid, ids, p in _requests(6, min_tokens_per_s=10_000.0):
        eng.add_request(rid, params=p, prompt_token_ids=ids)
    eng.step()
    assert eng.num_running == 6 and eng.floors.admission_holds == 0
    assert eng._admissions() is None


def test_floor_weights_keep_greedy_output(tiny_llama_dir, tiny_drafter_dir, tmp_path):
    """A floor no step can meet (every request below it, weighted in every plan): greedy output is
    still plain greedy's, and the outcomes are counted."""
    reqs = _requests(5, max_tokens=20, seed=3)
    plain = drive(LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1, seed=0,
                                         enforce_eager=True)), reqs)
    eng = _engine(tiny_llama_dir, tiny_drafter_dir, tmp_path, sla_min_tokens_per_s=50_000.0)
    eng.floors.min_elapsed = 0.0
    weights = []
    plan = eng.speculative.policy.plan_with_stats

    def spy(*a, **k):
        weights.extend(k.get("weights") or [])
        return plan(*a, **k)

    eng.speculative.policy.plan_with_stats = spy
    floored = drive(eng, reqs)
    for rid, _, _ in reqs:
        assert floored[rid].outputs[0].token_ids == plain[rid].outputs[0].token_ids
    assert weights and max(weights) == eng.floors.max_weight  # the plans saw the floors
    assert eng.floors.missed == 5 and eng.floors.met == 0  # 50,000 tok/s: missed, and counted
    # an unreachable floor is best effort: it holds nothing once a decoding step has been measured
    # (before that, requests with floors are admitted one per step)
    assert eng.floors.admission_holds < 5


def test_a_request_sets_or_relaxes_its_floor(tiny_llama_dir, tiny_drafter_dir, tmp_path):
    eng = _engine(tiny_llama_dir, tiny_drafter_dir, tmp_path, sla_min_tokens_per_s=5.0)
    a = eng.add_request("a", params=SamplingParams(max_tokens=2), prompt_token_ids=[5, 6, 7])
    b = eng.add_request("b", params=SamplingParams(max_tokens=2, min_tokens_per_s=0), prompt_token_ids=[5, 6, 7])
    c = eng.add_request("c", params=SamplingParams(max_tokens=2, min_tokens_per_s=80.5), prompt_token_ids=[5, 6, 7])
    assert (a.floor, b.floor, c.floor) == (5.0, 0.0, 80.5)
    for bad in (-1.0, float("nan"), float("inf"), 1e9, "fast", True):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(min_tokens_per_s=bad)
        assert e.value.param == "min_tokens_per_s"
    for bad in (1.5, 2**40, None):
        with pytest.raises(SamplingParamsError) as e:
            SamplingParams(priority=bad)
        assert e.value.param == "priority"


def test_priority_orders_admission(tiny_llama_dir, tmp_path):
    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1, seed=0, enforce_eager=True,
                                 max_num_seqs=1))
    for rid, prio in (("low", 5), ("first", 0), ("urgent", -3), ("second", 0), ("urgent2", -3)):
        eng.add_request(rid, params=SamplingParams(max_tokens=2, priority=prio), prompt_token_ids=[5, 6, 7])
    order = [s.request_id for s in eng.batcher.waiting]
    assert order == ["urgent", "urgent2", "first", "second", "low"]
    finished = []
    while eng.has_unfinished_requests():
        finished += [o.request_id for o in eng.step() if o.finished]
    assert finished == order
