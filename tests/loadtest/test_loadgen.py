"""The load generator against a fake OpenAI endpoint whose delays, errors and usage the test controls."""

from __future__ import annotations

import asyncio
import json
import random
import time

import numpy as np
import pytest

from fake_openai_server import MODEL, FakeOpenAI
from dspark_serve.loadtest.cli import measure, run_main
from dspark_serve.loadtest.client import check_base_url, is_loopback_url
from dspark_serve.loadtest.runner import LoadConfig, poisson_arrival_times, run_load
from dspark_serve.loadtest.stats import SLA, describe, percentile, summarize
from dspark_serve.loadtest.workloads import RequestSpec

TOL = 0.05  # seconds of scheduling slack on a loaded 2-core machine


@pytest.fixture
def fake():
    with FakeOpenAI() as srv:
        yield srv


def cfg(srv: FakeOpenAI, **kw) -> LoadConfig:
    kw.setdefault("concurrency", None if "request_rate" in kw else 1)
    return LoadConfig(base_url=srv.url, model=MODEL, progress=False, **kw)


def reqs(*prompts: str, max_tokens: int = 16) -> list[RequestSpec]:
    return [RequestSpec(p, max_tokens) for p in prompts]


def test_latency_arithmetic_from_known_delays(fake):
    # The server sleeps 0.3 s before the first chunk and 0.1 s between chunks, and records when it sent
    # each one (same process, same clock). On a loaded machine a sleep can overrun and a connection can
    # take a while to open, so the client's numbers are checked against what the server actually did:
    # never less than the requested delays, and within TOL of the server's own send times.
    asyncio.run(run_load(reqs("n=1 ttft=0"), cfg(fake)))  # pay the one-off costs (client, first connection)
    fake.sends.clear()
    out = asyncio.run(run_load(reqs(*["ttft=0.3 itl=0.1 n=5"] * 2), cfg(fake, concurrency=2)))
    assert out.stopped_by == "num_requests" and out.incomplete == 0
    assert len(fake.sends) == 2
    firsts = [s[0] - t for s, t in zip(fake.sends, fake.arrivals[-2:])]  # the server's own TTFTs
    server_itl = sum(b - a for s in fake.sends for a, b in zip(s, s[1:]))  # and the sum of its gaps
    for r in out.results:
        assert r.ok and r.status == 200 and r.usage_reported
        assert r.output_tokens == 5 and r.chunks == 5 and r.prompt_tokens == 7
        assert 0.3 <= min(firsts) <= r.ttft < max(firsts) + 0.5  # + opening a connection, sending the body
        assert len(r.itl) == 4 and all(x >= 0.1 - TOL for x in r.itl)
        assert r.e2e >= r.ttft + sum(r.itl) and r.e2e == pytest.approx(r.ttft + sum(r.itl), abs=TOL)
        assert r.tpot == pytest.approx((r.e2e - r.ttft) / 4)
        assert r.tpot >= 0.1 - TOL / 2
        assert r.tokens_per_s_per_user == pytest.approx(1 / r.tpot)
    assert sum(sum(r.itl) for r in out.results) == pytest.approx(server_itl, abs=TOL)
    s = summarize(out.results, out.duration)
    assert s["requests_completed"] == 2 and s["output_tokens_total"] == 10
    assert s["itl_s"]["n"] == 8
    assert s["itl_s"]["mean"] == pytest.approx(server_itl / 8, abs=TOL / 8)
    assert s["output_token_throughput"] == pytest.approx(10 / out.duration)
    # Both ran at once: one request's time, not two (1.4 s serially).
    assert out.duration < max(r.e2e for r in out.results) + 0.2 < 1.4


def test_output_tokens_from_usage_else_counted_chunks(fake):
    # 3 tokens per chunk (as a speculative server sends): usage says 12, the chunks say 4.
    specs = reqs("n=4 tpc=3 itl=0.001", "n=4 tpc=3 itl=0.001 usage=0")
    out = asyncio.run(run_load(specs, cfg(fake)))
    with_usage, without = out.results
    assert with_usage.usage_reported and with_usage.output_tokens == 12 and with_usage.chunks == 4
    assert not without.usage_reported and without.output_tokens == 4
    assert fake.bodies[0]["stream_options"] == {"include_usage": True}
    out = asyncio.run(run_load(specs[:1], cfg(fake, include_usage=False)))
    assert "stream_options" not in fake.bodies[-1] and out.results[0].output_tokens == 4


def test_completions_endpoint_and_request_fields(fake):
    out = asyncio.run(run_load(reqs("n=3 itl=0.001", max_tokens=9),
                               cfg(fake, endpoint="completions", temperature=0.5, ignore_eos=True,
                                   extra_body={"top_p": 0.9})))
    assert out.results[0].ok and out.results[0].output_tokens == 3
    body = fake.bodies[0]
    assert body["prompt"] == "n=3 itl=0.001" and body["max_tokens"] == 9 and body["stream"] is True
    assert body["temperature"] == 0.5 and body["ignore_eos"] is True and body["top_p"] == 0.9
    assert body["model"] == MODEL


def test_percentiles_match_numpy():
    rng = random.Random(1)
    for n in (1, 2, 7, 100, 1001):
        xs = [rng.expovariate(1.0) for _ in range(n)]
        for q in (0, 25, 50, 90, 99, 100):
            assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    d = describe(range(1, 101))
    assert (d["n"], d["mean"], d["p50"], d["p90"], d["p99"]) == (100, 50.5, 50.5, pytest.approx(90.1),
                                                                  pytest.approx(99.01))
    assert describe([None, None]) == {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None,
                                      "min": None, "max": None}


def test_goodput_counts_only_requests_within_the_sla(fake):
    fast = "ttft=0.01 itl=0.01 n=6"  # ~100 tokens/s per user
    slow = "ttft=0.01 itl=0.1 n=3"  # ~10 tokens/s per user
    late = "ttft=0.5 itl=0.01 n=6"  # fast, but a long first token
    specs = reqs(fast, slow, fast, late, slow, fast)
    point = asyncio.run(measure(specs, cfg(fake, concurrency=6), SLA(min_tokens_per_s_per_user=30)))
    s = point["summary"]
    g = s["goodput"]
    assert g["requests"] == 4  # the three fast and the late one (no TTFT bound yet)
    assert g["output_token_throughput"] == pytest.approx(4 * 6 / s["duration_s"])
    assert g["request_throughput"] == pytest.approx(4 / s["duration_s"])
    assert g["fraction_of_completed"] == pytest.approx(4 / 6)
    out = summarize([_result(r) for r in point["requests"]], s["duration_s"],
                    SLA(min_tokens_per_s_per_user=30, max_ttft=0.3))
    assert out["goodput"]["requests"] == 3 and out["goodput"]["sla"] == {"min_tokens_per_s_per_user": 30,
                                                                           "max_ttft_s": 0.3}
    assert summarize([], 1.0)["goodput"] is None


def _result(d: dict):
    from dspark_serve.loadtest.client import RequestResult

    d = {k: v for k, v in d.items() if k not in ("tpot", "tokens_per_s_per_user")}
    return RequestResult(**d)


def test_errors_are_counted_by_status(fake):
    specs = reqs("n=2 itl=0.001", "status=429", "status=500", "status=429", "n=2 streamerr=1", "n=2 itl=0.001")
    point = asyncio.run(measure(specs, cfg(fake, concurrency=2), SLA()))
    s = point["summary"]
    assert s["requests_completed"] == 2 and s["requests_failed"] == 4 and s["requests_sent"] == 6
    assert s["errors_by_status"] == {"429": 2, "500": 2}  # the in-stream error keeps its own code
    assert any("fake error" in e for e in s["error_examples"])
    assert s["output_tokens_total"] == 4
    failed = [r for r in point["requests"] if not r["ok"]]
    assert {r["status"] for r in failed} == {429, 500} and all(r["ttft"] is None or r["status"] == 500 for r in failed)


def test_connection_errors_are_errors_not_crashes():
    c = LoadConfig(base_url="http://127.0.0.1:9", model="x", concurrency=1, progress=False, request_timeout=2)
    out = asyncio.run(run_load(reqs("a"), c))
    s = summarize(out.results, out.duration)
    assert s["requests_failed"] == 1 and list(s["errors_by_status"]) == ["ConnectError"]


def test_open_loop_sends_the_poisson_arrivals_within_the_duration(fake):
    rate, duration, seed = 40.0, 1.0, 3
    times = poisson_arrival_times(1000, rate, seed)
    expected = sum(t < duration for t in times)
    t0 = time.perf_counter()
    out = asyncio.run(run_load(reqs(*["ttft=0.001 n=1"] * 1000),
                               cfg(fake, request_rate=rate, max_duration=duration, seed=seed)))
    assert time.perf_counter() - t0 < duration + 1.0
    assert out.stopped_by == "max_duration"
    assert abs(len(fake.arrivals) - expected) <= 1
    assert abs(len(out.results) + out.incomplete - expected) <= 1
    # Arrivals follow the schedule: the server sees them spread over the second, not in a burst.
    assert fake.arrivals[-1] - fake.arrivals[0] == pytest.approx(times[expected - 1] - times[0], abs=0.15)


def test_open_loop_stops_after_num_requests(fake):
    out = asyncio.run(run_load(reqs(*["ttft=0.001 n=1"] * 10), cfg(fake, request_rate=100.0, seed=0)))
    assert len(fake.arrivals) == 10 and out.stopped_by == "num_requests"
    assert poisson_arrival_times(5, 2.0, 7) == poisson_arrival_times(5, 2.0, 7)
    assert poisson_arrival_times(3, float("inf"), 0) == [0.0, 0.0, 0.0]


def test_open_loop_max_concurrency_caps_requests_in_flight(fake):
    out = asyncio.run(run_load(reqs(*["ttft=0.05 n=1"] * 8),
                               cfg(fake, request_rate=float("inf"), max_concurrency=2)))
    assert len(out.results) == 8 and fake.max_in_flight == 2


def test_closed_loop_keeps_exactly_concurrency_in_flight(fake):
    out = asyncio.run(run_load(reqs(*["ttft=0.05 itl=0.02 n=3"] * 12), cfg(fake, concurrency=3)))
    assert len(out.results) == 12 and all(r.ok for r in out.results)
    assert fake.max_in_flight == 3 and out.max_in_flight == 3
    assert [r.index for r in out.results] == list(range(12))


def test_max_duration_stops_a_run_of_long_requests(fake):
    t0 = time.perf_counter()
    out = asyncio.run(run_load(reqs(*["ttft=0.05 itl=0.1 n=50"] * 10), cfg(fake, concurrency=2, max_duration=0.7)))
    assert time.perf_counter() - t0 < 2.0
    assert out.stopped_by == "max_duration" and out.incomplete == 2 and out.results == []
    assert out.duration == pytest.approx(0.7, abs=0.1)
    s = summarize(out.results, out.duration, incomplete=out.incomplete)
    assert s["requests_incomplete"] == 2 and s["requests_failed"] == 0 and s["requests_sent"] == 2


def test_non_loopback_urls_are_refused_unless_allowed():
    for url in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:8000", "http://127.3.2.1"):
        assert is_loopback_url(url)
        check_base_url(url, allow_remote=False)
    for url in ("http://10.0.0.1:8000", "http://example.com", "http://0.0.0.0:8000", "https://8.8.8.8"):
        assert not is_loopback_url(url)
        with pytest.raises(SystemExit, match="--allow-remote"):
            check_base_url(url, allow_remote=False)
        check_base_url(url, allow_remote=True)
    with pytest.raises(SystemExit, match="allow-remote"):
        run_main(["--base-url", "http://192.168.1.5:8000", "--num-requests", "1"])
    with pytest.raises(SystemExit):
        run_main(["--base-url", "ftp://127.0.0.1"])


def test_cli_run_writes_one_result_file(fake, tmp_path, capsys):
    md = tmp_path / "table.md"
    rc = run_main(["--base-url", fake.url, "--dataset", "synthetic", "--input-len", "8", "--max-tokens", "4",
                   "--num-requests", "4", "--concurrency", "2", "--result-dir", str(tmp_path), "--name", "r1",
                   "--markdown", str(md), "--no-progress", "--sla-min-tokens-per-s-per-user", "1"])
    assert rc == 0
    res = json.loads((tmp_path / "r1.json").read_text())
    assert res["command"].startswith("python -m dspark_serve.loadtest --base-url")
    assert "--concurrency 2" in res["command"]
    assert set(res["machine"]) >= {"cpu", "cores", "torch"} and "commit" in res["git"]
    assert res["server"]["version"] == {"version": "fake-1.0", "model": "fake-model"}
    assert res["workload"]["dataset"] == "synthetic" and res["workload"]["num_requests"] == 4
    assert res["load"]["mode"] == "closed" and res["load"]["concurrency"] == 2
    assert res["summary"]["requests_completed"] == 4 and res["summary"]["goodput"]["requests"] == 4
    assert len(res["requests"]) == 4 and "itl" not in res["requests"][0]
    spec = res["server_metrics"]["spec_decode"]
    assert spec["tau"] == pytest.approx(2.5) and spec["rounds"] == 8  # 4 requests x 2 rounds
    assert len(fake.bodies[0]["messages"][0]["content"].split()) == 8
    out = capsys.readouterr().out
    assert "| TTFT (ms) |" in out and md.read_text() == out.rstrip("\n") + "\n"
    with pytest.raises(SystemExit, match="not both"):
        run_main(["--base-url", fake.url, "--concurrency", "2", "--request-rate", "1"])
