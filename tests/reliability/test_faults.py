"""Faults: one request's failure stays its own; KV pressure, bad start-up paths, SIGTERM under load.

Engine-level cases use the tiny random model with the test-only fault hook
(engine/faults.py); server-level cases run the real default model on 127.0.0.1
with DSPARK_FAULT_INJECTION=1 and arm the hook with the body field `dspark_fault`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dspark_testing import REPO, ServerProcess, drive, serving, wait_until
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams
from dspark_serve.engine.faults import FaultInjector

CHAT = "/v1/chat/completions"


# ---------------------------------------------------------------- engine level (tiny model)

def _engine(model, drafter=None):
    spec = {"method": "dspark", "model": drafter, "num_speculative_tokens": 4, "verification": "fixed"} if drafter else None
    return LLMEngine(EngineConfig(model=model, dtype="float32", num_threads=1, seed=0, speculative_config=spec))


def _reqs():
    """Greedy requests and a seeded sampled one (q3): both must come out token-identical."""
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)] * 3
    params.append(SamplingParams(temperature=0.8, top_p=0.95, seed=7, max_tokens=24, ignore_eos=True))
    return [(f"q{i}", list(range(20 + 3 * i, 40 + 7 * i)), p) for i, p in enumerate(params)]


@pytest.mark.parametrize("kind", ["nan_logits", "prepare", "detokenize"])
@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "dspark"])
def test_a_fault_in_one_request_fails_it_alone(tiny_llama_dir, tiny_drafter_dir, kind, speculative):
    drafter = tiny_drafter_dir if speculative else None
    reqs = _reqs()
    ref = drive(_engine(tiny_llama_dir, drafter), reqs)
    eng = _engine(tiny_llama_dir, drafter)
    eng.faults = FaultInjector()
    eng.faults.arm("q1", kind)
    got = drive(eng, reqs)
    bad = got["q1"]
    assert bad.finished and bad.outputs[0].finish_reason == "error"
    assert bad.error and "Traceback" not in bad.error and "/" not in bad.error.replace("NaN or inf", "")
    for rid in ("q0", "q2", "q3"):  # the others: untouched, token for token
        assert got[rid].outputs[0].finish_reason == "length"
        assert got[rid].outputs[0].token_ids == ref[rid].outputs[0].token_ids
    assert eng.kv.num_used_blocks == 0 and not eng.seqs and not eng.faults._armed
    assert eng.stats.finished.get("error") == 1
    # The engine goes on serving.
    again = drive(eng, reqs[:1])
    assert again["q0"].outputs[0].token_ids == ref["q0"].outputs[0].token_ids


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_llama_dir, monkeypatch):
    import asyncio

    from dspark_serve.engine import AsyncEngine

    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1))
    try:
        real = eng.engine.runner.execute
        calls = {"n": 0}

        def flaky(*a, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise RuntimeError("/opt/secret/kernel.so: illegal instruction")
            return real(*a, **kw)

        monkeypatch.setattr(eng.engine.runner, "execute", flaky)
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)

        async def run(rid):
            last = None
            async for out in eng.generate(params=params, request_id=rid, prompt_token_ids=list(range(5, 30))):
                last = out
            return last

        first = asyncio.run(run("a"))
        assert first.outputs[0].finish_reason == "error"
        assert "/opt/secret" not in first.error and "RuntimeError" not in first.error
        second = asyncio.run(run("b"))
        assert second.outputs[0].finish_reason == "length" and len(second.outputs[0].token_ids) == 8
        assert eng.engine.kv.num_used_blocks == 0 and eng.dead is None
    finally:
        eng.shutdown()


# ---------------------------------------------------------------- the real server

def _chat(content: str, **kw) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, **kw}


def _metric(url: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in fam.samples:
            if s.name == name:
                return s.value
    return 0.0


def _idle(url: str) -> bool:
    return all(_metric(url, n) == 0 for n in ("dspark_num_requests_running", "dspark_num_requests_waiting",
                                              "dspark_kv_cache_used_blocks", "dspark_server_requests_in_flight"))


@pytest.fixture(scope="module")
def fault_server(tmp_path_factory):
    with serving(["--max-model-len", "1024", "--max-num-seqs", "8", "--kv-cache-memory", "128MiB"],
                 tmp_path_factory.mktemp("fault-server") / "server.log", env={"DSPARK_FAULT_INJECTION": "1"}) as srv:
        yield srv


def _run_concurrently(fns):
    results = [None] * len(fns)

    def call(i, fn):
        results[i] = fn()

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def _stream(url: str, body: dict) -> tuple[int, list]:
    with httpx.stream("POST", f"{url}{CHAT}", json={**body, "stream": True}, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    return r.status_code, [e if e == "[DONE]" else json.loads(e) for e in events]


def test_server_fault_in_one_request_leaves_the_others_their_answers(fault_server):
    url = fault_server.url
    prompts = ["Name three colours.", "What is 2 + 2?", "Say hello in French."]
    solo = [httpx.post(f"{url}{CHAT}", json=_chat(p), timeout=120).json()["choices"][0]["message"]["content"]
            for p in prompts]
    fns = [lambda p=p: httpx.post(f"{url}{CHAT}", json=_chat(p), timeout=120) for p in prompts]
    fns.append(lambda: httpx.post(f"{url}{CHAT}", json=_chat("Count to ten.", dspark_fault="detokenize"), timeout=120))
    fns.append(lambda: httpx.post(f"{url}{CHAT}", json=_chat("Name a bird.", dspark_fault="prepare"), timeout=120))
    fns.append(lambda: _stream(url, _chat("Count to five.", dspark_fault="nan_logits")))
    *normal, detok, prepare, (stream_status, events) = _run_concurrently(fns)
    for r, text in zip(normal, solo):
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
    for r in (detok, prepare):
        assert r.status_code == 500
        err = r.json()["error"]
        assert err["code"] == "engine_error" and "Traceback" not in err["message"] and ".py" not in err["message"]
    assert stream_status == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "engine_error" and "non-finite" in events[-2]["error"]["message"]
    wait_until(lambda: _idle(url), 10, what="KV blocks and requests back to 0")
    assert httpx.get(f"{url}/health").status_code == 200
    r = httpx.post(f"{url}{CHAT}", json=_chat(prompts[0]), timeout=120)
    assert r.json()["choices"][0]["message"]["content"] == solo[0]
    log = fault_server.log_text()
    assert "InjectedFault" in log  # the details are in the server log, not in the answer


def test_fault_field_is_ignored_without_the_hook():
    """Without DSPARK_FAULT_INJECTION the field is an unknown extra field: accepted and ignored."""
    from starlette.testclient import TestClient

    from fake_engine import FakeEngine
    from dspark_serve.server.app import create_app

    client = TestClient(create_app(FakeEngine()))
    r = client.post(CHAT, json={**_chat("hi"), "dspark_fault": "nan_logits"})
    assert r.status_code == 200


def test_a_dead_engine_makes_health_and_new_requests_503(tiny_llama_dir, monkeypatch):
    from starlette.testclient import TestClient

    from dspark_serve.engine import AsyncEngine
    from dspark_serve.server.app import create_app

    monkeypatch.setenv("DSPARK_FAULT_INJECTION", "1")
    eng = AsyncEngine(EngineConfig(model=tiny_llama_dir, dtype="float32", num_threads=1))
    try:
        client = TestClient(create_app(eng))
        assert client.get("/health").status_code == 200
        r = client.post(CHAT, json=_chat("hi", dspark_fault="kill_engine"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "engine_dead"
        r = client.post(CHAT, json=_chat("hi again"))
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
    finally:
        eng.shutdown()


def test_a_dead_engine_thread_ends_the_streams_and_the_server_exits_1(tmp_path, tiny_llama_dir):
    srv = ServerProcess(["--model", tiny_llama_dir, "--max-num-seqs", "4"], tmp_path / "server.log",
                        env={"DSPARK_FAULT_INJECTION": "1"})
    srv.wait_ready()
    url = srv.url
    health: list = []

    def watch_health():  # every answer until the server is gone (one kept-alive connection: the
        # server exits about 0.1 s after the death once the in-flight requests have their errors)
        with httpx.Client(timeout=2) as http:
            while srv.proc.poll() is None:
                try:
                    r = http.get(f"{url}/health")
                    health.append((r.status_code, r.json()["status"]))
                except httpx.HTTPError:
                    pass

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    streams: list = [None] * 2

    def client(i):
        streams[i] = _stream(url, _chat(f"Story number {i}, please.", max_tokens=800))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: _metric(url, "dspark_num_requests_running") == 2, 30, what="2 streams running")
    killer = httpx.post(f"{url}{CHAT}", json=_chat("Goodbye.", dspark_fault="kill_engine"), timeout=60)
    for t in threads:
        t.join(60)
    code = srv.proc.wait(30)
    watcher.join(10)
    srv.stop()
    assert killer.status_code == 503 and killer.json()["error"]["code"] == "engine_unavailable"
    for status, events in streams:  # in flight: an OpenAI-shaped error event, then [DONE]
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["error"]["code"] == "engine_unavailable", events[-2]
        assert "choices" in events[0]
    assert (503, "engine_dead") in health and health[0] == (200, "ok")
    assert code == 1
    log = srv.log_text()
    assert "the engine thread died: EngineKilled" in log and "exiting with status 1" in log


def test_kv_pressure_preempts_and_every_request_recovers(tmp_path):
    # 8 MiB of KV (target + drafter, fp32) is ~10 blocks of 16 tokens: four 48-token answers
    # cannot all be resident, so the engine preempts and recomputes.
    with serving(["--max-model-len", "512", "--max-num-seqs", "4", "--kv-cache-memory", "8MiB"],
                 tmp_path / "server.log") as srv:
        url = srv.url
        prompts = ["Describe the sea.", "Describe a forest.", "Describe a city.", "Describe the sky."]
        body = lambda p: _chat(p, max_tokens=48)  # noqa: E731
        solo = [httpx.post(f"{url}{CHAT}", json=body(p), timeout=120).json()["choices"][0]["message"]["content"]
                for p in prompts]
        assert _metric(url, "dspark_engine_preemptions_total") == 0
        together = _run_concurrently([lambda p=p: httpx.post(f"{url}{CHAT}", json=body(p), timeout=180)
                                      for p in prompts])
        assert [r.status_code for r in together] == [200] * 4
        assert [r.json()["choices"][0]["message"]["content"] for r in together] == solo
        assert _metric(url, "dspark_engine_preemptions_total") > 0
        wait_until(lambda: _idle(url), 10, what="KV blocks back to 0")


@pytest.mark.parametrize("case", ["model", "drafter", "drafter_config"])
def test_bad_model_or_drafter_path_exits_with_one_line(tmp_path, case):
    args = ["--num-threads", "1"]
    if case == "model":
        args += ["--model", str(tmp_path / "no-such-model")]
        expect = "does not exist"
    elif case == "drafter":
        args += ["--speculative-config", json.dumps({"method": "dspark", "model": str(tmp_path / "no-such-drafter")})]
        expect = "no config.json"
    else:
        (tmp_path / "config.json").write_text("{not json")
        args += ["--speculative-config", json.dumps({"method": "dspark", "model": str(tmp_path)})]
        expect = "is not valid JSON"
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "dspark_serve.server.cli", "--log-level", "error", "serve",
                        "--port", "0", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 1, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("dspark serve: error: cannot start:") and expect in lines[0]
    assert "Traceback" not in p.stderr


def test_sigterm_under_load_drains_every_admitted_request(tmp_path):
    grace = 40.0
    srv = ServerProcess(["--max-model-len", "512", "--max-num-seqs", "2", "--max-waiting", "16",
                         "--shutdown-grace-period", str(grace)], tmp_path / "server.log")
    srv.wait_ready()
    url = srv.url
    results: list = [None] * 6

    def client(i):
        results[i] = _stream(url, _chat(f"Tell me fact number {i} about bees.", max_tokens=12))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    wait_until(lambda: _metric(url, "dspark_server_requests_in_flight") == 6, 30, what="6 requests admitted")
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{url}/health").status_code == 503, 5, what="draining")
    late = httpx.post(f"{url}{CHAT}", json=_chat("too late"), timeout=30)
    assert late.status_code == 503 and late.json()["error"]["code"] == "shutting_down"
    for t in threads:
        t.join(grace + 30)
    code = srv.proc.wait(grace + 30)
    elapsed = time.monotonic() - t0
    srv.stop()
    assert code == 0 and elapsed < grace
    for status, events in results:  # admitted before the signal: each one finished normally
        assert status == 200 and events[-1] == "[DONE]"
        assert events[-2]["choices"][0]["finish_reason"] == "length", events[-2]
