"""`python -m dspark_serve.loadtest sweep` end to end against fake servers it starts itself; peer commands."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from fake_openai_server import SPEC_PER_REQUEST, FakeOpenAI
from dspark_serve.loadtest.peers import PEERS, availability, converted_dir, peer
from dspark_serve.loadtest.sweep import build_parser, server_specs, sweep_main

FAKE = Path(__file__).with_name("fake_openai_server.py")


def fake_command(n: int) -> str:
    return f"{shlex.quote(sys.executable)} {shlex.quote(str(FAKE))} --port {{port}} --n {n}"


def test_sweep_starts_each_configuration_and_writes_json_markdown_plots(tmp_path):
    rc = sweep_main([
        "--config-name", "fast", "--server-command", fake_command(3),
        "--config-name", "broken", "--server-command", f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)'",
        "--config-name", "slow", "--server-command", fake_command(6),
        "--concurrency-grid", "1,2", "--num-requests", "4", "--max-tokens", "8", "--input-len", "4",
        "--startup-timeout", "30", "--result-dir", str(tmp_path), "--name", "s", "--no-progress",
        "--sla-min-tokens-per-s-per-user", "10",
    ])
    assert rc == 0
    sweep = json.loads((tmp_path / "s.json").read_text())
    assert sweep["command"].startswith("python -m dspark_serve.loadtest sweep --config-name fast")
    assert sweep["grid"] == [1, 2] and sweep["workload"]["dataset"] == "synthetic"
    fast, broken, slow = sweep["configs"]
    assert "exited with 3" in broken["error"] and "points" not in broken
    for c, n in ((fast, 3), (slow, 6)):
        assert c["exit_code"] is not None and Path(c["log"]).exists()
        assert [p["concurrency"] for p in c["points"]] == [1, 2]
        for p in c["points"]:
            s = p["summary"]
            assert s["requests_completed"] == 4 and s["output_tokens_total"] == 4 * n
            assert p["load"]["max_in_flight"] == p["concurrency"]
            spec = p["server_metrics"]["spec_decode"]  # only this point's 4 requests, not the warm-up
            assert spec["rounds"] == 4 * SPEC_PER_REQUEST["drafts"]
            assert spec["tau"] == pytest.approx(2.5) and spec["mean_verify_budget"] == pytest.approx(2.0)
            assert s["goodput"]["requests"] == 4
    md = (tmp_path / "s.md").read_text()
    assert "| fast | 1 |" in md and "| slow | 2 |" in md and "broken | failed to start" in md
    for kind in ("frontier", "verify-budget", "latency-cdf"):
        assert (tmp_path / f"s-{kind}.png").stat().st_size > 1000


def test_sweep_against_a_running_endpoint(tmp_path):
    with FakeOpenAI() as srv:
        rc = sweep_main(["--base-url", srv.url, "--config-name", "peer-x", "--concurrency-grid", "3",
                         "--num-requests", "6", "--result-dir", str(tmp_path), "--name", "e", "--no-plots",
                         "--no-progress", "--warmup-requests", "0"])
        assert rc == 0 and srv.max_in_flight == 3 and len(srv.arrivals) == 6
    (c,) = json.loads((tmp_path / "e.json").read_text())["configs"]
    assert c["name"] == "peer-x" and c["base_url"] == srv.url and c["points"][0]["summary"]["requests_completed"] == 6
    # --request-rate: open loop, Poisson arrivals, the grid's concurrency caps requests in flight
    with FakeOpenAI(ttft=0.1) as srv:
        rc = sweep_main(["--base-url", srv.url, "--config-name", "peer-x", "--concurrency-grid", "2",
                         "--num-requests", "12", "--request-rate", "40", "--result-dir", str(tmp_path), "--name", "r",
                         "--no-plots", "--no-progress", "--warmup-requests", "0"])
        assert rc == 0 and len(srv.arrivals) == 12 and srv.max_in_flight == 2
    sweep = json.loads((tmp_path / "r.json").read_text())
    load = sweep["configs"][0]["points"][0]["load"]
    assert sweep["request_rate"] == 40 and "Poisson arrivals at 40 req/s" in sweep["per_point"]
    assert (load["mode"], load["request_rate"], load["max_concurrency"], load["max_in_flight"]) == ("open", 40, 2, 2)
    with pytest.raises(SystemExit, match="allow-remote"):
        sweep_main(["--base-url", "http://10.1.2.3:8000"])
    with pytest.raises(SystemExit, match="nothing to measure"):
        sweep_main(["--concurrency-grid", "1"])


def test_configuration_flags_pair_up():
    args = build_parser().parse_args([
        "--config-name", "off", "--server-args", "--speculative-config '{\"method\": \"none\"}' --max-num-seqs 8",
        "--server-args", "--seed 1",  # no name: a configuration of its own
        "--peer", "transformers", "--peer", "llama-cpp-python", "--model-path", "/m/x.gguf", "--peer-threads", "2",
    ])
    specs = server_specs(args)
    assert [s.name for s in specs] == ["off", "config2", "transformers", "llama-cpp-python"]
    off = specs[0].command(1234)
    assert off[1:4] == ["-m", "dspark_serve.server.cli", "serve"] and off[off.index("--port") + 1] == "1234"
    assert off[-4:] == ["--speculative-config", '{"method": "none"}', "--max-num-seqs", "8"]
    assert specs[0].env["HF_HUB_OFFLINE"] == "1"
    assert "--no-repack" not in specs[2].command(1)
    extra = server_specs(build_parser().parse_args(["--peer", "llama-cpp-python", "--model-path", "/m/x.gguf",
                                                    "--peer-args=--no-repack --foo 'a b'"]))[0]
    assert extra.command(1)[-3:] == ["--no-repack", "--foo", "a b"] and "--no-repack" in extra.note


def test_peer_commands_load_the_same_file_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path / "cache"))
    t = peer("transformers", "/models/dir/m.gguf", threads=2, dtype="float32")
    cmd = t.command(9000)
    # transformers serve gets an HF directory converted from the GGUF (once, by `prepare`, not at construction).
    target = str(converted_dir("/models/dir/m.gguf", "float32"))
    assert target.startswith(str(tmp_path / "cache" / "hf-from-gguf")) and t.prepare is not None
    assert not (tmp_path / "cache").exists()
    assert cmd[1] == "serve" and "--continuous-batching" in cmd and cmd[-1] == target
    assert cmd[cmd.index("--dtype") + 1] == "float32" and cmd[cmd.index("--device") + 1] == "cpu"
    assert cmd[cmd.index("--port") + 1] == "9000" and cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert t.env["HF_HUB_OFFLINE"] == "1" and t.env["OMP_NUM_THREADS"] == "2" and t.model == target
    hf_dir = peer("transformers", "/models/hf-dir", threads=1, dtype="float32")
    assert hf_dir.command(1)[-1] == "/models/hf-dir" and hf_dir.prepare is None
    ll = peer("llama-cpp-python", "/models/dir/m.gguf", threads=2)
    cmd = ll.command(9001)
    assert cmd[1:3] == ["-m", "llama_cpp.server"] and cmd[cmd.index("--model") + 1] == "/models/dir/m.gguf"
    assert cmd[cmd.index("--interrupt_requests") + 1] == "False" and ll.health_path == "/v1/models"
    assert "{port}" in ll.display() and "9001" in ll.display(9001)
    for name in PEERS:
        ok, why = availability(name)
        assert isinstance(ok, bool) and why


def _pt(tput: float, user: float = 1.0) -> dict:
    return {"concurrency": 1, "summary": {"output_token_throughput": tput, "tokens_per_s_per_user": {"mean": user},
                                          "requests_completed": 4}}


def test_combine_rounds_reports_the_median_round_and_the_median_of_per_round_ratios():
    from dspark_serve.loadtest.sweep import combine_rounds

    base = [_pt(100, 10), _pt(50, 5), _pt(80, 8)]  # the machine was slow in round 2
    cand = [_pt(120, 11), _pt(65, 6), _pt(90, 10)]
    p = combine_rounds(cand, base)
    assert p["median_round"] == 2 and p["summary"]["output_token_throughput"] == 90
    assert [r["output_token_throughput"] for r in p["rounds"]] == [120, 65, 90]
    ratios = p["vs_baseline"]["throughput_ratios"]
    assert ratios == pytest.approx([1.2, 1.3, 1.125])
    assert p["vs_baseline"]["throughput_ratio"] == pytest.approx(1.2)  # not 90 / 80 of the median rounds
    assert p["vs_baseline"]["tokens_per_s_per_user_ratio"] == pytest.approx(1.2)
    even = combine_rounds([_pt(3), _pt(1), _pt(2), _pt(4)], None)
    assert even["summary"]["output_token_throughput"] == 2 and "vs_baseline" not in even  # the lower middle


def test_interleaved_rounds_alternate_the_configurations_point_by_point(monkeypatch):
    import argparse

    from dspark_serve.loadtest import sweep as sweep_mod

    calls = []
    speed = {"a": 100.0, "b": 150.0}

    def fake_point(name, args, model, specs_all, c, per_point, round_index=0):
        calls.append((name, c))
        slow = 0.5 if len(calls) in (3, 4) else 1.0  # a slow spell hits the two neighbouring points alike
        return {**_pt(speed[name.split()[0]] * slow), "concurrency": c}

    monkeypatch.setattr(sweep_mod, "measure_point", fake_point)
    entries = [{"name": "a"}, {"name": "b"}]
    live = [(e, e["name"], argparse.Namespace(), "m") for e in entries]
    sweep_mod.sweep_interleaved(live, argparse.Namespace(rounds=2), [], [1, 4], None, baseline="a")
    assert calls == [("a round 1", 1), ("b round 1", 1), ("a round 1", 4), ("b round 1", 4),
                     ("a round 2", 1), ("b round 2", 1), ("a round 2", 4), ("b round 2", 4)]
    a, b = entries
    assert [p["concurrency"] for p in b["points"]] == [1, 4] and "vs_baseline" not in a["points"][0]
    assert all(p["vs_baseline"]["throughput_ratio"] == pytest.approx(1.5) for p in b["points"])


def test_fresh_prompts_give_every_point_and_round_a_slice_of_its_own():
    import argparse

    from dspark_serve.loadtest.sweep import point_specs

    specs = list(range(100))
    args = argparse.Namespace(fresh_prompts=True, warmup_requests=2, grid=[1, 4])
    per_point = lambda c: 3 * c  # noqa: E731
    got = {(r, c): point_specs(args, specs, c, per_point, r) for r in range(2) for c in (1, 4)}
    assert got[(0, 1)] == [2, 3, 4] and got[(0, 4)] == list(range(5, 17))
    assert got[(1, 1)] == [17, 18, 19] and got[(1, 4)] == list(range(20, 32))
    args.fresh_prompts = False
    assert point_specs(args, specs, 4, per_point, 1) == list(range(12))


def test_sweep_rounds_end_to_end_keeps_every_server_up_and_writes_the_ratio_column(tmp_path):
    rc = sweep_main([
        "--config-name", "fast", "--server-command", fake_command(3),
        "--config-name", "broken", "--server-command", f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)'",
        "--config-name", "slow", "--server-command", fake_command(6),
        "--rounds", "2", "--baseline", "slow",
        "--concurrency-grid", "1,2", "--num-requests", "4", "--max-tokens", "8", "--input-len", "4",
        "--startup-timeout", "30", "--result-dir", str(tmp_path), "--name", "r", "--no-progress", "--no-plots",
    ])
    assert rc == 0
    sweep = json.loads((tmp_path / "r.json").read_text())
    assert sweep["rounds"] == 2 and sweep["baseline"] == "slow"
    fast, broken, slow = sweep["configs"]
    assert "exited with 3" in broken["error"] and "points" not in broken
    for c, n in ((fast, 3), (slow, 6)):
        assert c["exit_code"] is not None and [p["concurrency"] for p in c["points"]] == [1, 2]
        for p in c["points"]:
            assert len(p["rounds"]) == 2 and p["summary"]["output_tokens_total"] == 4 * n
            assert all(r["requests_completed"] == 4 for r in p["rounds"])
    assert all(p["vs_baseline"]["throughput_ratio"] > 0 for p in fast["points"])
    md = (tmp_path / "r.md").read_text()
    assert "x slow: output tok/s, tok/s/user" in md and "2 rounds, configurations interleaved" in md
    with pytest.raises(SystemExit):
        sweep_main(["--config-name", "a", "--server-command", fake_command(3), "--rounds", "2",
                    "--baseline", "nope", "--concurrency-grid", "1", "--result-dir", str(tmp_path)])
