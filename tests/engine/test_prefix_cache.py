"""Prefix caching: hashed full prompt blocks shared by reference count, an LRU pool of
free-but-cached blocks, reuse at admission; output unchanged (float32), no block leaked."""

from __future__ import annotations

import random

import pytest
import torch

from dspark_testing import drive, drive_mixed
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams
from dspark_serve.engine.block_manager import BlockAllocator, BlockTable, KVCacheManager

BS = 4


def _kv(num_blocks=16, salt=""):
    return KVCacheManager(num_blocks, BS, prefix_caching=True, cache_salt=salt)


def _computed(kv: KVCacheManager, tokens: list[int], num_prompt: int | None = None) -> BlockTable:
    """A table that computed `tokens` (all prompt unless `num_prompt`) and registered its blocks."""
    t = BlockTable()
    kv.grow(t, len(tokens))
    kv.cache_prompt_blocks(t, tokens, len(tokens) if num_prompt is None else num_prompt, len(tokens))
    return t


# ---------------------------------------------------------------- the block manager


def test_a_prefix_is_shared_by_reference_and_kept_after_its_owner_frees_it():
    kv = _kv()
    toks = list(range(100, 114))  # 3 full blocks + 2 tokens
    a = _computed(kv, toks)
    assert len(a.hashes) == 3 and kv.allocator.num_cached == 3
    b = BlockTable()
    hit = kv.match_prefix(b, toks + [7, 8], len(toks) + 2)
    assert hit == 12 and b.blocks == a.blocks[:3] and b.num_tokens == 12
    assert all(kv.allocator.refcount(x) == 2 for x in a.blocks[:3])
    kv.free(a)
    assert all(kv.allocator.refcount(x) == 1 for x in b.blocks)
    kv.free(b)
    assert kv.num_used_blocks == 0 and kv.num_free_blocks == 16 and kv.allocator.num_cached == 3
    c = BlockTable()
    assert kv.match_prefix(c, toks, len(toks)) == 12  # free-but-cached blocks come back
    assert kv.num_free_blocks == 13


def test_a_hit_leaves_at_least_one_token_to_compute_and_stops_at_the_first_difference():
    kv = _kv()
    toks = list(range(50, 62))  # exactly 3 blocks
    _computed(kv, toks)
    t = BlockTable()
    assert kv.match_prefix(t, toks, len(toks)) == 8  # the last block would leave nothing to compute
    kv.free(t)
    other = toks[:5] + [999] + toks[6:]  # differs inside block 1
    assert kv.match_prefix(t, other, len(other)) == 4
    kv.free(t)
    # a different salt (model, dtype, quantization) never matches
    kv2 = _kv(salt="other")
    kv2.allocator = kv.allocator
    assert kv2.match_prefix(t, toks, len(toks)) == 0


def test_only_prompt_blocks_are_cached():
    kv = _kv()
    toks = list(range(10, 26))  # 4 blocks; the prompt is the first 6 tokens
    t = _computed(kv, toks, num_prompt=6)
    assert len(t.hashes) == 1 and kv.allocator.num_cached == 1
    probe = BlockTable()
    assert kv.match_prefix(probe, toks, len(toks)) == 4


def test_free_blocks_are_evicted_least_recently_freed_first_and_tails_before_heads():
    a = BlockAllocator(4)
    kv = KVCacheManager(4, BS, prefix_caching=True)
    kv.allocator = a
    t1 = _computed(kv, list(range(8)))  # 2 blocks
    t2 = _computed(kv, list(range(100, 108)))
    kv.free(t1)
    kv.free(t2)
    assert a.num_free == 4 and a.num_cached == 4
    a.allocate(1)  # evicts t1's tail block first
    probe = BlockTable()
    assert kv.match_prefix(probe, list(range(8)) + [1], 9) == 4
    kv.free(probe)
    a.allocate(2)  # then t2's tail and head: t1's head, used and freed again above, is the most recent
    assert kv.match_prefix(probe, list(range(100, 108)) + [1], 9) == 0
    assert kv.match_prefix(probe, list(range(8)) + [1], 9) == 4
    assert a.evictions == 3


def test_truncate_never_cuts_a_cached_block_and_drop_cache_forgets_everything():
    kv = _kv()
    t = _computed(kv, list(range(9)))
    with pytest.raises(RuntimeError, match="cached prefix"):
        kv.truncate(t, 4)
    kv.truncate(t, 8)
    kv.drop_prefix_cache()
    assert kv.allocator.num_cached == 0
    kv.free(t)
    assert kv.num_free_blocks == 16


# ---------------------------------------------------------------- the engine (tiny model, float32)


def _engine(model, caching=True, drafter=None, **kw):
    spec = {"method": "dspark", "model": drafter, "num_speculative_tokens": 5, "verification": "fixed",
            "draft_skipping": False} if drafter else None
    cfg = dict(model=model, dtype="float32", num_threads=1, seed=0, enable_prefix_caching=caching,
               speculative_config=spec)
    cfg.update(kw)
    return LLMEngine(EngineConfig(**cfg))


def _conversation_requests(rng, turns=3):
    """Requests that share prefixes: a long system prompt, multi-turn continuations, repeats."""
    system = [rng.randrange(3, 2000) for _ in range(37)]
    reqs = []
    for i in range(4):
        reqs.append((f"s{i}", system + [rng.randrange(3, 2000) for _ in range(5 + 7 * i)]))
    reqs.append(("again", list(reqs[1][1])))
    return reqs


def _run_turns(eng, rng_seed=0, sampled=False):
    """Single requests and a 3-turn conversation whose every turn's prompt is the previous
    prompt + its output + a new message; returns every output's token ids."""
    rng = random.Random(rng_seed)
    p = SamplingParams(temperature=0.8 if sampled else 0.0, seed=3 if sampled else None, max_tokens=12, ignore_eos=True)
    out = {}
    reqs = [(rid, ids, p) for rid, ids in _conversation_requests(rng)]
    for r in reqs:  # one at a time: later ones find the earlier ones' blocks cached
        out.update(drive(eng, [r]))
    prompt = reqs[0][1]
    for turn in range(3):
        done = drive(eng, [(f"turn{turn}", prompt, p)])[f"turn{turn}"]
        out[f"turn{turn}"] = done
        prompt = prompt + done.outputs[0].token_ids + [rng.randrange(3, 2000) for _ in range(6)]
    return {rid: o.outputs[0].token_ids for rid, o in out.items()}


@pytest.mark.parametrize("sampled", [False, True])
def test_outputs_are_identical_with_caching_on_and_off(tiny_llama_dir, sampled):
    on = _engine(tiny_llama_dir, True)
    got = _run_turns(on, sampled=sampled)
    want = _run_turns(_engine(tiny_llama_dir, False), sampled=sampled)
    assert got == want
    assert on.kv.prefix_hits > 0.4 * on.kv.prefix_queries  # the shared system prompt and earlier turns hit
    assert on.kv.num_used_blocks == 0 and on.kv.num_free_blocks == on.kv.num_blocks


def test_speculative_outputs_are_identical_with_caching_on_and_off(tiny_llama_dir, tiny_drafter_dir):
    on = _engine(tiny_llama_dir, True, tiny_drafter_dir)
    got = _run_turns(on)
    want = _run_turns(_engine(tiny_llama_dir, False, tiny_drafter_dir))
    assert got == want
    assert on.kv.prefix_hits > 0 and on.stats.spec_num_draft_tokens > 0


def test_the_hit_path_reads_the_cached_blocks(tiny_llama_dir):
    """Mutation check for the identity tests: corrupting the cached blocks' KV changes the output
    of a request that hits them, so equal outputs above mean the hits were read, and were right."""
    p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(40, 90))
    eng = _engine(tiny_llama_dir, True)
    first = drive(eng, [("a", prompt, p)])["a"].outputs[0].token_ids
    cached = list(eng.kv.allocator._block_of.values())
    assert len(cached) == 3
    bs = eng.kv.block_size
    slots = torch.tensor([b * bs + i for b in cached for i in range(bs)])
    eng.runner.kv[:, :, slots] = torch.randn_like(eng.runner.kv[:, :, slots]) * 10
    second = drive(eng, [("b", prompt, p)])["b"].outputs[0].token_ids
    assert eng.kv.prefix_hits == 48
    assert second != first


def test_a_shared_block_is_never_written(tiny_llama_dir, tiny_drafter_dir):
    """Requests that share cached blocks decode, verify drafts and roll back beside each other;
    the shared blocks' KV and drafter context stay bit for bit what they were."""
    eng = _engine(tiny_llama_dir, True, tiny_drafter_dir)
    prefix = list(range(100, 148))  # 3 blocks
    p = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    drive(eng, [("owner", prefix + [5], p)])
    cached = sorted(eng.kv.allocator._block_of.values())
    bs = eng.kv.block_size
    slots = torch.tensor([b * bs + i for b in cached for i in range(bs)])
    kv_before = eng.runner.kv[:, :, slots].clone()
    ctx_before = eng.runner.proposer.pool[:, :, slots].clone()
    drive(eng, [(f"r{i}", prefix + [7 + i] * (i + 1), p) for i in range(4)])
    assert eng.kv.prefix_hits >= 4 * 48
    assert torch.equal(eng.runner.kv[:, :, slots], kv_before)
    assert torch.equal(eng.runner.proposer.pool[:, :, slots], ctx_before)


def test_the_n_choices_of_a_request_share_its_prompt(tiny_llama_dir):
    """Siblings admitted in the same step hit the blocks the first one computes in that step."""
    on = _engine(tiny_llama_dir, True)
    off = _engine(tiny_llama_dir, False)
    prompt = list(range(200, 265))
    reqs = [(f"c{k}", prompt, SamplingParams(temperature=1.0, seed=k, max_tokens=10)) for k in range(3)]
    got = drive(on, reqs)
    want = drive(off, reqs)
    assert {r: o.outputs[0].token_ids for r, o in got.items()} == {r: o.outputs[0].token_ids for r, o in want.items()}
    assert on.kv.prefix_hits == 2 * 64  # the 2nd and 3rd choices reuse 4 blocks each
    assert on.stats.prompt_tokens == 3 * 65  # counted once per request, cached or computed


def test_chunked_prefill_over_a_partly_cached_prompt_and_preemption(tiny_llama_dir):
    rng = random.Random(5)
    system = [rng.randrange(3, 2000) for _ in range(70)]
    reqs = [(f"p{i}", system + [rng.randrange(3, 2000) for _ in range(3 + 20 * i)],
             SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)) for i in range(5)]
    ref = drive(_engine(tiny_llama_dir, False, max_num_batched_tokens=4096), reqs)
    # chunks of 24 tokens over partly cached prompts; a 14-block pool preempts and resumes
    tight = _engine(tiny_llama_dir, True, kv_cache_memory=14 * 16 * 2 * 2 * 1 * 16 * 4, max_num_batched_tokens=24)
    got = drive(tight, reqs, arrivals={0: [0], 3: [1, 2], 9: [3, 4]})
    assert tight.stats.preemptions > 0 and tight.kv.prefix_hits > 0
    for rid, _, _ in reqs:
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert tight.kv.num_used_blocks == 0 and tight.kv.num_free_blocks == tight.kv.num_blocks


def test_kv_accounting_after_200_mixed_requests_with_caching(tiny_llama_dir):
    """Aborts, preemptions and shared prefixes: at the end every block is free (plain or cached),
    none is referenced, and the cache still serves hits."""
    rng = random.Random(2)
    eng = _engine(tiny_llama_dir, True, kv_cache_memory=24 * 16 * 2 * 2 * 1 * 16 * 4, max_num_seqs=16,
                  max_num_batched_tokens=96)
    heads = [[rng.randrange(3, 2000) for _ in range(rng.choice([16, 33, 50]))] for _ in range(4)]

    def request(rng, i):
        prompt = rng.choice(heads) + [rng.randrange(3, 2000) for _ in range(rng.randint(1, 40))]
        return prompt, SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 30))

    def check(e):
        a = e.kv.allocator
        assert a.num_used + a.num_free == a.num_blocks

    finished, aborted = drive_mixed(eng, rng, request, check=check)
    assert finished + aborted == 200 and aborted > 10
    assert eng.stats.preemptions > 0 and eng.kv.prefix_hits > 0
    a = eng.kv.allocator
    assert a.num_used == 0 and a.num_free == a.num_blocks and not a._refs
    assert set(a._block_of.values()) == set(a._cached_free)  # every cached block is free, and listed


def test_an_engine_error_drops_the_cache(tiny_llama_dir):
    eng = _engine(tiny_llama_dir, True)
    drive(eng, [("a", list(range(10, 60)), SamplingParams(temperature=0, max_tokens=3))])
    assert eng.kv.allocator.num_cached == 3
    eng.fail_all("boom")
    assert eng.kv.allocator.num_cached == 0 and eng.kv.num_free_blocks == eng.kv.num_blocks
