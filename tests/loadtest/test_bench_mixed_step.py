"""The mixed-step benchmark's summary and report (the steps themselves are timed by
`python -m dspark_serve.loadtest.bench_mixed_step`, not in tests)."""

from __future__ import annotations

import pytest

from dspark_serve.loadtest.bench_mixed_step import markdown, summarize


def test_rows_give_medians_speedups_and_the_engines_route():
    times = {(16, True): [0.10, 0.09, 0.30], (16, False): [0.12, 0.12, 0.11],
             (256, True): [0.80, 0.81, 0.79], (256, False): [0.60, 0.70, 0.65]}
    rows = summarize(times, [16, 256], limit=1 << 14)
    assert [r["prompt_tokens"] for r in rows] == [16, 256]
    assert rows[0]["graph_ms"] == pytest.approx(100.0) and rows[0]["speedup"] == pytest.approx(1.2)
    # 16 tokens: no longer than a verification block, the graph whatever the bound
    assert rows[0]["pairs"] == 0 and rows[0]["engine_route"] == "graph"
    assert rows[1]["pairs"] == 256 * 257 // 2 and rows[1]["engine_route"] == "eager"
    assert summarize(times, [256], limit=1 << 16)[0]["engine_route"] == "graph"
    res = {"machine": {"cpu": "cpu", "cores": 2, "torch": "2", "commit": "abc"}, "threads": 2, "decodes": 15,
           "decode_prompt": 200, "reps": 3, "prompt_pairs_in_step": 1 << 14, "rows": rows, "decode_ms": 70.0,
           "command": "python -m dspark_serve.loadtest.bench_mixed_step"}
    md = markdown(res)
    assert "| 16 | 100.0 | 120.0 | 1.20x | graph |" in md and "| 256 | 800.0 | 650.0 | 0.81x | eager |" in md
