"""AsyncEngine: concurrent streams, abort on early exit, errors stay with their request."""

from __future__ import annotations

import asyncio

import pytest

from engine import AsyncEngine, EngineConfig, QueueFullError, RequestError, SamplingParams


@pytest.fixture(scope="module")
def aengine(tiny_llama_dir):
    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1, max_num_seqs=8))
    yield eng
    eng.shutdown()


async def _collect(eng, ids, params, rid=None):
    outs = [o async for o in eng.generate(params=params, prompt_token_ids=ids, request_id=rid)]
    return outs


async def _wait_blocks_free(eng, timeout=10.0):
    for _ in range(int(timeout / 0.02)):
        s = eng.stats()
        if s["kv_used_blocks"] == 0 and s["num_running"] == 0:
            return True
        await asyncio.sleep(0.02)
    return False


def test_concurrent_streams_complete_and_match_sequential(aengine):
    async def main():
        p = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        prompts = [list(range(10 + i, 30 + 2 * i)) for i in range(12)]
        together = await asyncio.gather(*[_collect(aengine, ids, p) for ids in prompts])
        alone = [await _collect(aengine, ids, p) for ids in prompts[:3]]
        return together, alone

    together, alone = asyncio.run(main())
    for outs in together:
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 12
        assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text
    for a, t in zip(alone, together):
        assert a[-1].outputs[0].token_ids == t[-1].outputs[0].token_ids


def test_leaving_the_stream_early_aborts_and_frees_blocks(aengine):
    async def main():
        p = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        gen = aengine.generate(params=p, prompt_token_ids=list(range(10, 200)))
        n = 0
        async for _ in gen:
            n += 1
            if n == 3:
                break
        await gen.aclose()
        return await _wait_blocks_free(aengine)

    assert asyncio.run(main())
    assert aengine.engine.stats.aborted >= 1


def test_a_bad_request_fails_alone(aengine):
    async def main():
        good = asyncio.create_task(_collect(aengine, list(range(10, 40)), SamplingParams(temperature=0, max_tokens=8)))
        with pytest.raises(RequestError):
            await _collect(aengine, [], SamplingParams())
        with pytest.raises(RequestError):
            await _collect(aengine, [10**9], SamplingParams())  # refused inside the engine thread
        return await good

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason in ("stop", "length")


def test_queue_bound(tiny_llama_dir):
    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1, max_num_seqs=1), max_waiting=2)
    try:
        async def main():
            p = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
            tasks = [asyncio.create_task(_collect(eng, list(range(10, 30)), p)) for _ in range(6)]
            results = await asyncio.gather(*tasks, return_exceptions=True)
            return results

        results = asyncio.run(main())
        assert any(isinstance(r, QueueFullError) for r in results)
        assert any(isinstance(r, list) and r[-1].finished for r in results)
    finally:
        eng.shutdown()
