"""Context lookup: n-gram matches in a request's own context as drafts, chosen against the drafter's."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_testing import drive
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams
from dspark_serve.engine.lookup import LookupStats, TokenArrays, expected_accepted, find_match
from dspark_serve.engine.speculative import SpecConfig


def test_the_longest_match_and_its_most_recent_occurrence_win():
    #        0  1  2  3  4  5  6  7  8  9 10 11 12
    toks = [5, 1, 2, 3, 9, 8, 2, 3, 7, 6, 1, 2, 3]
    # suffix "1 2 3" occurred at 1..3 (followed by 9 8 ...); "2 3" also at 6..7 (followed by 7), more recent
    assert find_match(toks, 8, 1, 3) == (3, [9, 8, 2])
    assert find_match(toks, 2, 1, 3) == (2, [7, 6, 1])  # capped at 2: the most recent "2 3"
    assert find_match(toks, 8, 4, 3) is None  # no 4-token match
    assert find_match([4, 5, 6], 8, 1, 3) is None  # the last token never occurred before
    assert find_match([4], 8, 1, 3) is None and find_match([], 8, 1, 3) is None


def test_a_loop_shorter_than_the_draft_repeats_itself():
    # "a b a b a b": the last occurrence of "a b" ends 2 tokens back; the continuation is the loop
    assert find_match([1, 2, 1, 2, 1, 2], 8, 1, 5) == (4, [1, 2, 1, 2, 1])
    assert find_match([7, 7, 7], 8, 1, 4) == (2, [7, 7, 7, 7])


def test_the_match_is_found_in_the_prompt_as_in_the_output():
    prompt = [10, 11, 12, 13, 14, 15]
    out = [99, 11, 12]
    assert find_match(prompt + out, 8, 1, 4) == (2, [13, 14, 15, 99])


def test_find_match_agrees_with_a_brute_force_search():
    rng = np.random.default_rng(0)
    for _ in range(300):
        toks = rng.integers(0, 4, size=int(rng.integers(1, 40))).tolist()
        want = None
        for n in range(min(5, len(toks) - 1), 0, -1):
            starts = [s for s in range(len(toks) - n) if toks[s:s + n] == toks[len(toks) - n:]]
            if starts:
                e = starts[-1] + n
                cont = []
                for k in range(6):
                    cont.append(toks[e + k] if e + k < len(toks) else cont[e + k - len(toks)])
                want = (n, cont)
                break
        assert find_match(toks, 5, 1, 6) == want, toks


def test_lookup_stats_learn_the_acceptance_of_each_match_length():
    st = LookupStats(max_n=4, gamma=3, prior=0.5, prior_weight=2.0)
    np.testing.assert_allclose(st.confidences(True, 2), [0.5, 0.5, 0.5])
    for _ in range(8):
        st.record(True, 2, num_verified=3, num_accepted=3)  # all accepted
        st.record(True, 1, num_verified=3, num_accepted=0)  # first rejected: positions 2, 3 not judged
    np.testing.assert_allclose(st.confidences(True, 2), [9 / 10, 9 / 10, 9 / 10])
    np.testing.assert_allclose(st.confidences(True, 1), [1 / 10, 0.5, 0.5])
    np.testing.assert_allclose(st.confidences(False, 2), [0.5, 0.5, 0.5])  # sampled requests apart
    st.record(True, 3, num_verified=2, num_accepted=1)  # accepted 1, rejected 2; 3 not verified
    np.testing.assert_allclose(st.confidences(True, 3), [2 / 3, 1 / 3, 0.5])
    assert set(st.acceptance()["greedy"]) == {1, 2, 3} and st.acceptance()["sampled"] == {}
    assert expected_accepted(np.array([0.5, 0.5, 1.0])) == pytest.approx(0.5 + 0.25 + 0.25)


def test_lookup_config_keys_are_checked():
    assert SpecConfig.from_dict({"model": "d"}).prompt_lookup_max == 8
    s = SpecConfig.from_dict({"model": "d", "prompt_lookup_max": 0})
    assert s.prompt_lookup_max == 0
    with pytest.raises(ValueError, match="prompt_lookup_max"):
        SpecConfig.from_dict({"model": "d", "prompt_lookup_max": -1})
    with pytest.raises(ValueError, match="prompt_lookup_max"):
        SpecConfig.from_dict({"model": "d", "prompt_lookup_max": True})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpecConfig.from_dict({"model": "d", "prompt_lookup_max": 3, "prompt_lookup_min": 4})
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        SpecConfig.from_dict({"model": "d", "prompt_lookup_min": 0})


def _engine(model, drafter, lookup_max=8, record=None):
    cfg = {"method": "dspark", "model": drafter, "num_speculative_tokens": 7, "verification": "fixed",
           "draft_skipping": False, "prompt_lookup_max": lookup_max}
    return LLMEngine(EngineConfig(model=model, dtype="float32", num_threads=1, seed=0, speculative_config=cfg,
                                  record_acceptance=record))


def _reqs(n=6, max_tokens=48):
    # prompts that repeat themselves, so the context has matches from the first round on
    return [(f"q{i}", [20 + i, 30, 31, 32, 33, 40 + i] * 4, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                                           ignore_eos=True)) for i in range(n)]


def _always_lookup(eng):
    # a lookup prior no drafter confidence can beat: every round with a match copies from the context
    eng.speculative.lookup = LookupStats(8, eng.gamma, prior=0.999, prior_weight=1e9)


def test_greedy_output_with_context_lookup_is_token_identical(tiny_llama_dir, tiny_drafter_dir, tmp_path):
    reqs = _reqs()
    plain = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1, seed=0))
    ref = drive(plain, reqs)
    rec = tmp_path / "rounds.jsonl"
    eng = _engine(tiny_llama_dir, tiny_drafter_dir, record=str(rec))
    _always_lookup(eng)
    got = drive(eng, reqs, arrivals={0: [0, 1], 2: [2, 3], 5: [4, 5]})
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    st = eng.stats
    assert st.spec_lookup_num_drafts > 0 and st.spec_lookup_num_accepted_tokens > 0
    assert st.spec_lookup_num_draft_tokens > st.spec_lookup_num_accepted_tokens  # rejections too
    assert st.spec_lookup_num_drafts <= st.spec_num_drafts
    assert eng.kv.num_used_blocks == 0 and not eng.speculative._token_arrays._arrays  # finished: forgotten
    rows = [json.loads(x) for x in rec.read_text().splitlines()]
    lookup_rows = [r for r in rows if r.get("lookup")]
    assert len(lookup_rows) == st.spec_lookup_num_drafts and all("logits" not in r for r in lookup_rows)
    # the online calibration of the drafter's confidences never sees a lookup round
    online = eng.speculative.online
    assert online is None or (sum(cal.num_recorded for cal in online.values())
                              == st.spec_num_drafts - st.spec_lookup_num_drafts)


def test_lookup_is_chosen_only_where_it_promises_more_than_the_drafter(tiny_llama_dir, tiny_drafter_dir):
    reqs = _reqs(n=3)
    eng = _engine(tiny_llama_dir, tiny_drafter_dir)
    eng.speculative.lookup = LookupStats(8, eng.gamma, prior=1e-3, prior_weight=1e9)  # never worth it
    drive(eng, reqs)
    assert eng.stats.spec_num_drafts > 0 and eng.stats.spec_lookup_num_drafts == 0
    off = _engine(tiny_llama_dir, tiny_drafter_dir, lookup_max=0)
    assert off.speculative.lookup is None
    drive(off, reqs)
    assert off.stats.spec_num_drafts > 0 and off.stats.spec_lookup_num_drafts == 0


def test_token_arrays_follow_growth_truncation_and_replacement():
    arrays = TokenArrays()
    toks = list(range(10))
    assert arrays.get("a", toks).tolist() == toks
    toks += list(range(10, 200))  # grows past the buffer
    assert arrays.get("a", toks).tolist() == toks
    assert arrays.get("a", toks[:50]).tolist() == toks[:50]  # truncated
    other = [7] * 60
    assert arrays.get("a", other).tolist() == other  # not a prefix any more
    assert arrays.get("b", [1, 2]).tolist() == [1, 2]
    arrays.forget("a")
    assert "a" not in arrays._arrays and arrays.get("b", [1, 2, 3]).tolist() == [1, 2, 3]
