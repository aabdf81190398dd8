"""Greedy with speculation is token-identical to greedy without it, on the real default model (float32)."""

from __future__ import annotations

import pytest

from dspark_testing import CHAT_PROMPTS, drive, make_random_drafter
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template

MAX_TOKENS = 48  # every round rejects (a random drafter): 48 rounds per request, over three KV blocks


@pytest.fixture(scope="module")
def spec_engine(llm_fp32, tmp_path_factory):
    drafter = make_random_drafter(llm_fp32.engine.runner.model, tmp_path_factory.mktemp("smol-drafter"), block_size=7)
    return LLMEngine(EngineConfig(dtype="float32", num_threads=2, speculative_config={
        "method": "dspark", "model": drafter, "num_speculative_tokens": 7,
        # verify every draft, never skip: the point is many rejecting rounds
        "verification": "fixed", "draft_skipping": False}))


def _requests(tok):
    # mixed lengths: some prompts repeated to lengthen them
    return [(f"p{i}", apply_chat_template(tok, [{"role": "user", "content": p * (1 + i % 3)}]),
             SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))
            for i, p in enumerate(CHAT_PROMPTS)]


def _tokens(done: dict) -> dict:
    return {rid: out.outputs[0].token_ids for rid, out in done.items()}


def test_greedy_identical_single_and_batched_with_mid_flight_arrivals(llm_fp32, spec_engine):
    reqs = _requests(llm_fp32.get_tokenizer())
    # reference: plain greedy (batch-invariant, tested elsewhere), all at once
    ref = _tokens(drive(llm_fp32.engine, reqs, {0: list(range(10))}))
    # speculative, 8 concurrent of mixed lengths with arrivals mid-flight, then the other 2 one at a time
    batched = _tokens(drive(spec_engine, reqs, {0: [0, 1, 2, 3], 5: [4, 5], 17: [6, 7]}))
    single = {}
    for i in (8, 9):
        single.update(_tokens(drive(spec_engine, reqs, {0: [i]})))
    for rid, _, _ in reqs:
        got = batched.get(rid, single.get(rid))
        assert got == ref[rid], rid
    st = spec_engine.stats
    assert st.spec_num_drafts > 100
    assert spec_engine.kv.num_used_blocks == 0
