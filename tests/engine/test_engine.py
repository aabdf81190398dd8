"""Continuous batching, chunked prefill, preemption, stop rules and KV accounting (tiny model)."""

from __future__ import annotations

import random

import pytest

from dspark_testing import drive, drive_mixed
from dspark_serve.engine import EngineConfig, LLMEngine, RequestError, SamplingParams


def _engine(path, **kw):
    cfg = dict(model=path, dtype="float32", num_threads=1, seed=0)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return tiny_llama_dir


def _prompt(rng, n):
    return [rng.randrange(3, 2000) for _ in range(n)]


def test_chunked_prefill_and_tiny_pools_do_not_change_greedy_output(tiny):
    rng = random.Random(0)
    reqs = [(f"r{i}", _prompt(rng, n), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
            for i, n in enumerate([5, 70, 130, 33])]
    ref = drive(_engine(tiny, max_num_batched_tokens=4096), reqs)
    chunked_engine = _engine(tiny, max_num_batched_tokens=32)
    chunked = drive(chunked_engine, reqs)
    # 12 blocks of 16: not all four fit at once, so some are preempted and recomputed
    tight_engine = _engine(tiny, kv_cache_memory=12 * 16 * 2 * 2 * 1 * 16 * 4, max_num_batched_tokens=64)
    tight = drive(tight_engine, reqs)
    assert tight_engine.stats.preemptions > 0
    for rid, _, _ in reqs:
        assert chunked[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
        assert tight[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert chunked_engine.kv.num_used_blocks == 0 and tight_engine.kv.num_used_blocks == 0


def test_kv_accounting_after_200_mixed_requests(tiny):
    """Aborts mid-way, preemptions from a deliberately small pool: every block comes back."""
    rng = random.Random(1)
    eng = _engine(tiny, kv_cache_memory=24 * 16 * 2 * 2 * 1 * 16 * 4, max_num_seqs=16, max_num_batched_tokens=96)
    total = eng.kv.num_blocks

    def request(rng, i):
        p = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 40),
                           seed=rng.choice([None, i]), top_p=rng.choice([1.0, 0.9]))
        return _prompt(rng, rng.randint(1, 90)), p

    def check(e):
        assert e.kv.num_used_blocks <= total

    finished, aborted = drive_mixed(eng, rng, request, check=check)
    assert finished + aborted == 200 and aborted > 10
    assert eng.stats.preemptions > 0
    assert eng.kv.num_used_blocks == 0 and eng.kv.num_free_blocks == total
    assert not eng.seqs and eng.num_running == 0 and eng.num_waiting == 0


def test_stop_rules(tiny):
    eng = _engine(tiny)
    ids = list(range(10, 30))
    base = drive(eng, [("a", ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))])["a"].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 24
    # a stop string taken from the middle of the greedy text
    text = base.text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text.find(stop)
    out = drive(eng, [("b", ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))])["b"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:cut]
    out = drive(eng, [("c", ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                include_stop_str_in_output=True))])["c"].outputs[0]
    assert out.text == text[:cut + len(stop)]
    # a stop token id ends generation at that token (kept in token_ids)
    tok = base.token_ids[5]
    first = base.token_ids.index(tok)
    out = drive(eng, [("d", ids, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[tok]))])["d"].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and out.token_ids == base.token_ids[: first + 1]
    # EOS (from the model's generation config) ends it unless ignore_eos
    eos = next(iter(eng.eos_token_ids))
    out = drive(eng, [("e", ids, SamplingParams(temperature=0, max_tokens=24, stop_token_ids=[base.token_ids[0]]))])["e"].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1
    assert eos in eng.eos_token_ids


def test_streamed_deltas_add_up(tiny):
    eng = _engine(tiny)
    eng.add_request("s", params=SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=["zzzz"]),
                    prompt_token_ids=list(range(50, 60)))
    text, toks = "", []
    while eng.has_unfinished_requests():
        for out in eng.step():
            text += out.outputs[0].delta_text
            toks += out.outputs[0].delta_token_ids
            last = out
    assert text == last.outputs[0].text and toks == last.outputs[0].token_ids


def test_max_model_len_and_bad_prompts(tiny):
    eng = _engine(tiny, max_model_len=64)
    with pytest.raises(RequestError) as e:
        eng.add_request("long", params=SamplingParams(), prompt_token_ids=list(range(3, 70)))
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(RequestError):
        eng.add_request("empty", params=SamplingParams(), prompt_token_ids=[])
    with pytest.raises(RequestError):
        eng.add_request("oov", params=SamplingParams(), prompt_token_ids=[10**9])
    out = drive(eng, [("fit", list(range(3, 60)), SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))])["fit"]
    assert out.outputs[0].finish_reason == "length" and len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 64


def test_seeded_sampling_is_reproducible_alone_or_batched(tiny):
    eng = _engine(tiny)
    p = SamplingParams(temperature=1.0, max_tokens=16, seed=7, ignore_eos=True)
    alone = drive(eng, [("x", list(range(5, 25)), p)])["x"].outputs[0].token_ids
    mixed = drive(eng, [("y", list(range(5, 25)), p)] + [
        (f"z{i}", list(range(100 + i, 130)), SamplingParams(temperature=1.0, max_tokens=10)) for i in range(4)
    ])
    assert mixed["y"].outputs[0].token_ids == alone


def test_a_request_whose_sampling_cannot_be_prepared_fails_alone(tiny):
    """A value the API would refuse (here top logprobs past the vocabulary) reaching the engine fails its
    own request; a greedy and a seeded neighbour in the same steps get their usual tokens."""
    reqs = [("g", list(range(5, 25)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)),
            ("s", list(range(40, 70)), SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))]
    ref = drive(_engine(tiny), reqs)
    bad = SamplingParams(temperature=0.7, max_tokens=12, ignore_eos=True)
    bad.logprobs = 10**6
    eng = _engine(tiny)
    got = drive(eng, reqs + [("bad", list(range(80, 90)), bad)], arrivals={0: [0, 1], 3: [2]})
    assert got["bad"].outputs[0].finish_reason == "error" and "internal error" in got["bad"].error
    for rid in ("g", "s"):
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert eng.kv.num_used_blocks == 0 and eng.stats.finished == {"length": 2, "error": 1}
