"""AsyncEngine: concurrent streams, abort on early exit, errors stay with their request."""

from __future__ import annotations

import asyncio

import pytest

from dspark_serve.engine import AsyncEngine, EngineConfig, QueueFullError, RequestError, SamplingParams


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


def test_the_engine_is_built_and_stepped_in_its_own_thread(tiny_llama_dir, monkeypatch):
    """All torch work stays in one thread: a second thread running OpenMP regions (building
    the engine in the caller's thread did) makes libgomp stop spin-waiting on small machines
    (docs/benchmarks/README.md: 52 -> 30 ms per token at batch 1)."""
    import threading

    import dspark_serve.engine.async_engine as ae

    seen = []
    real_init, real_step = ae.LLMEngine.__init__, ae.LLMEngine.step

    def init(self, *a, **kw):
        seen.append(("init", threading.current_thread().name))
        real_init(self, *a, **kw)

    def step(self):
        seen.append(("step", threading.current_thread().name))
        return real_step(self)

    monkeypatch.setattr(ae.LLMEngine, "__init__", init)
    monkeypatch.setattr(ae.LLMEngine, "step", step)
    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1))
    try:
        async def run():
            async for out in eng.generate(params=SamplingParams(max_tokens=3, ignore_eos=True),
                                          prompt_token_ids=[5, 6, 7]):
                last = out
            return last

        assert asyncio.run(run()).finished
    finally:
        eng.shutdown()
    assert {name for _, name in seen} == {"dspark-engine"} and {"init", "step"} <= {k for k, _ in seen}


def test_engine_state_is_read_in_the_engine_thread_only(aengine):
    """stats() serves what the engine thread published after its last step; on_engine_thread runs
    a function between two steps in that thread (the calibration endpoint goes through it)."""
    import threading

    names = aengine.on_engine_thread(lambda eng: (threading.current_thread().name, eng.num_running))
    assert names == ("dspark-engine", 0)
    with pytest.raises(ZeroDivisionError):
        aengine.on_engine_thread(lambda eng: 1 / 0)  # its exception reaches the caller, the engine goes on

    async def run():
        return await _collect(aengine, [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))

    outs = asyncio.run(run())
    s = aengine.stats()  # published before the last output went out: the request is counted
    assert s["generation_tokens"] >= 4 and s["num_running"] == 0 and s["num_waiting"] == 0
    assert aengine.calibration_report() is None  # no drafter
    assert outs[-1].finished


def test_an_engine_that_cannot_be_built_raises_in_the_caller(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "missing"), dtype="float32", num_threads=1))


def test_a_dead_engine_thread_ends_every_request_and_refuses_new_ones(tiny_llama_dir, monkeypatch):
    """The `kill_engine` fault raises a BaseException inside the step, past every handler: the
    thread ends, and nobody is left waiting on it."""
    from dspark_serve.engine import EngineDeadError

    monkeypatch.setenv("DSPARK_FAULT_INJECTION", "1")
    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1))
    try:
        async def main():
            long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
            running = asyncio.create_task(_collect(eng, list(range(10, 40)), long, rid="running"))
            while eng.stats()["num_running"] == 0:
                await asyncio.sleep(0.01)
            eng.faults.arm("killer", "kill_engine")
            killer = asyncio.create_task(_collect(eng, list(range(50, 60)), long, rid="killer"))
            results = await asyncio.gather(running, killer, return_exceptions=True)
            with pytest.raises(EngineDeadError):
                await _collect(eng, [5, 6, 7], SamplingParams(max_tokens=2))
            with pytest.raises(EngineDeadError):
                eng.on_engine_thread(lambda e: e.num_running)
            return results

        results = asyncio.run(main())
        assert [type(r) for r in results] == [EngineDeadError, EngineDeadError]
        assert eng.dead and "internal error" in eng.dead and "killer" not in eng.dead
        eng._thread.join(5)
        assert not eng._thread.is_alive()
    finally:
        eng.shutdown()
