"""The decode-step-vs-context benchmark's arithmetic and report (the step itself is timed by
`python -m dspark_serve.loadtest.bench_decode_context`, not in tests)."""

from __future__ import annotations

import pytest

from dspark_serve.loadtest.bench_decode_context import markdown, slopes


def test_the_slope_is_the_context_dependent_time_per_sequence_and_context_token():
    points = [{"sequences": 16, "context": 32, "ms": 62.0}, {"sequences": 16, "context": 1000, "ms": 365.6},
              {"sequences": 16, "context": 300, "ms": 130.7}, {"sequences": 1, "context": 32, "ms": 18.8}]
    s = slopes(points)
    # shortest and longest context of each sequence count, whatever their order; one context: no slope
    assert set(s) == {"16"}
    assert s["16"]["us_per_seq_ctx_token"] == pytest.approx(1000 * (365.6 - 62.0) / (16 * 968))
    assert s["16"]["context_share_at_longest"] == pytest.approx((365.6 - 62.0) / 365.6)
    res = {"command": "python -m dspark_serve.loadtest.bench_decode_context", "threads": 2, "reps": 15,
           "dtype": "float32", "kernel": "vnni (avx2)", "attention": "gather + SDPA (torch)",
           "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "commit": "abc"}, "points": points, "slopes": s}
    md = markdown(res)
    assert "| 16 | 1000 | 365.6 |" in md and "| 16 | 19.60 | 83% |" in md
