"""loadtest.profile_decode on a tiny random-weight model: the split of a decode step adds up."""

import json

from dspark_serve.loadtest import profile_decode


def test_profile_splits_wall_time_into_ops_and_overhead(tiny_llama_dir, tmp_path):
    profile_decode.main(["--model", tiny_llama_dir, "--dtype", "float32", "--threads", "1",
                         "--batch", "1", "3", "--steps", "6", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "profile-decode.json").read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 3] and result["dtype"] == "float32"
    for r in result["rows"]:
        assert r["steps"] == 6 and r["tokens_per_s"] > 0
        assert 0 < r["op_ms_per_step"] <= r["wall_ms_per_step"] * 1.05
        assert abs(r["op_ms_per_step"] + r["overhead_ms_per_step"] - r["wall_ms_per_step"]) < 0.05 * r["wall_ms_per_step"] + 0.01
        assert abs(sum(r["families_ms_per_step"].values()) - r["op_ms_per_step"]) < 1e-6 * max(1.0, r["op_ms_per_step"]) + 1e-6
        assert r["families_ms_per_step"].get("matmul (linear / lm_head)", 0) > 0
    md = (tmp_path / "profile-decode.md").read_text()
    assert "| 1 |" in md and "| 3 |" in md and "overhead" in md
