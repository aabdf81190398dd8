"""`python -m dspark_serve.loadtest.bench_attention`: both paths timed on the same inputs, and they agree."""

from __future__ import annotations

import pytest
import torch

from dspark_serve.loadtest import bench_attention
from dspark_serve.models import kernels


@pytest.mark.skipif(not kernels.paged_attention_available(), reason="paged attention kernel unavailable here")
def test_a_small_grid_times_both_paths_and_they_agree():
    points = bench_attention.measure([(2, 40, 1), (2, 40, 3)], reps=1)
    assert [(p["sequences"], p["context"], p["queries"]) for p in points] == [(2, 40, 1), (2, 40, 3)]
    for p in points:
        assert p["kernel_ms"] > 0 and p["torch_ms"] > 0
        assert p["max_abs_diff"] < 0.05  # bf16 outputs of the same attention
    md = bench_attention.markdown({"command": "c", "machine": {"cpu": "x", "cores": 2, "torch": "t", "commit": "c"},
                                   "threads": 2, "points": points})
    assert md.count("\n| 2 | 40 |") == 2


@pytest.mark.skipif(not kernels.paged_attention_available(), reason="paged attention kernel unavailable here")
def test_float32_pools_are_timed_too():
    (p,) = bench_attention.measure([(2, 40, 2)], reps=1, dtype=torch.float32)
    assert p["max_abs_diff"] < 1e-5  # float32 outputs of the same attention: summation order only
