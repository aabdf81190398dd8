"""eval-drafter: the statistics from recorded rounds, and one real run on a tiny model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dspark_serve.scheduler.calibration import STSCalibrator
from dspark_serve.training.evaluate import analyse_rounds, auc, eval_drafter, plot_report, with_lookup


def test_auc_by_hand():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5]), np.array([0, 1])) == pytest.approx(0.5)
    assert auc(np.array([0.2, 0.3]), np.array([1, 1])) is None


def test_rounds_give_tau_conditional_acceptance_and_the_threshold_sweep():
    # gamma 3; four rounds with 0, 1, 3, 2 accepted of 3 verified
    logits = np.array([[-1.0, 0.0, 0.0], [2.0, -2.0, 0.0], [3.0, 3.0, 3.0], [2.0, 1.0, -1.0]])
    acc = np.array([0, 1, 3, 2])
    ver = np.array([3, 3, 3, 3])
    res = analyse_rounds(logits, acc, ver)
    assert res["tau"] == pytest.approx((1 + 2 + 4 + 3) / 4)
    pos = res["positions"]
    assert pos[0]["acceptance"] == pytest.approx(3 / 4)  # 3 of 4 rounds accept x1
    assert pos[1]["n"] == 3 and pos[1]["acceptance"] == pytest.approx(2 / 3)
    assert pos[2]["n"] == 2 and pos[2]["acceptance"] == pytest.approx(1 / 2)
    assert pos[0]["auc"] == pytest.approx(1.0)  # the one rejection has the lowest confidence
    sweep = {s["threshold"]: s for s in res["threshold_sweep"]}
    # t = 0.5: verify while sigmoid(logit) >= 0.5 -> l = 0, 1, 3, 2 -> tokens min(a, l) + 1
    assert sweep[0.5]["verified_per_round"] == pytest.approx((0 + 1 + 3 + 2) / 4)
    assert sweep[0.5]["tokens_per_round"] == pytest.approx((1 + 2 + 4 + 3) / 4)
    assert sweep[0.95]["verified_per_round"] == pytest.approx((0 + 0 + 3 + 0) / 4)
    cal = STSCalibrator([2.0, 1.0, 1.0])
    res2 = analyse_rounds(logits, acc, ver, cal)
    assert "ece_calibrated" in res2["positions"][0] and res2["reliability_calibrated"][0]["count"]


def test_tau_counts_the_context_lookup_rounds_and_the_confidence_statistics_do_not():
    logits = np.array([[1.0, 1.0, 1.0], [-1.0, 0.0, 0.0]])
    r = {"logits": logits, "accepted": np.array([2, 0]), "verified": np.array([3, 3]),
         "lookup_accepted": np.array([3, 3, 1]), "lookup_verified": np.array([3, 3, 3])}
    res = with_lookup(analyse_rounds(logits, r["accepted"], r["verified"]), r)
    assert res["drafter_tau"] == pytest.approx((3 + 1) / 2)
    assert res["lookup"]["rounds"] == 3 and res["lookup"]["share"] == pytest.approx(3 / 5)
    assert res["lookup"]["tau"] == pytest.approx((4 + 4 + 2) / 3)
    assert res["tau"] == pytest.approx((3 + 1 + 4 + 4 + 2) / 5) and res["rounds"] == 5
    assert res["positions"][0]["n"] == 2  # the drafter's rounds only
    none = {**r, "lookup_accepted": np.array([], dtype=np.int64), "lookup_verified": np.array([], dtype=np.int64)}
    plain = with_lookup(analyse_rounds(logits, r["accepted"], r["verified"]), none)
    assert "lookup" not in plain and plain["tau"] == pytest.approx(2.0)


def test_positions_no_round_reached_still_plot(tmp_path):
    """A short run where no round gets past position 2: every per-position list keeps gamma
    entries (None where unreached) and the reliability plot skips them instead of failing."""
    logits = np.array([[0.5, -0.5, 0.0], [1.0, 0.2, 0.0]])
    acc, ver = np.array([0, 1]), np.array([3, 3])
    res = analyse_rounds(logits, acc, ver, STSCalibrator([1.0, 1.0, 1.0]))
    assert [p["n"] for p in res["positions"]] == [2, 1, 0]
    assert len(res["reliability_raw"]) == len(res["reliability_calibrated"]) == 3
    assert res["reliability_calibrated"][2] is None and res["positions"][2]["ece_calibrated"] is None
    plot_report({"results": {"temperature_0": {"tiny": res}}}, tmp_path)
    assert (tmp_path / "reliability-temperature_0.png").stat().st_size > 0


def test_eval_drafter_runs_real_speculative_decoding(tmp_path, tiny_llama_dir, tiny_drafter_dir):
    prompts = tmp_path / "set.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [t]}) + "\n" for t in ["Hi", "Count to five", "Name a color"]))
    report = eval_drafter(tiny_drafter_dir, {"tiny": str(prompts)}, str(tmp_path / "out"), num_prompts=3,
                          max_tokens=12, temperatures=(0.0, 1.0), model=tiny_llama_dir, num_threads=1)
    for key in ("temperature_0", "temperature_1"):
        res = report["results"][key]["tiny"]
        assert res["rounds"] > 0 and res["tau"] >= 1.0
        assert len(res["positions"]) == 7
        assert (tmp_path / "out" / f"acceptance-{key}.png").stat().st_size > 0
        assert (tmp_path / "out" / f"reliability-{key}.png").stat().st_size > 0
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert saved["results"]["temperature_0"]["tiny"]["prompts"] == 3
    assert saved["draft_context_window"] is None  # the tiny drafter's config has none
    assert saved["prompt_lookup_max"] == 8  # the serving default
    # --draft-context-window / --prompt-lookup-max 0: recorded in the report, the same greedy tokens
    windowed = eval_drafter(tiny_drafter_dir, {"tiny": str(prompts)}, str(tmp_path / "out4"), num_prompts=3,
                            max_tokens=12, temperatures=(0.0,), model=tiny_llama_dir, num_threads=1, context_window=4,
                            prompt_lookup_max=0)
    assert windowed["draft_context_window"] == 4 and windowed["prompt_lookup_max"] == 0
    assert "lookup" not in windowed["results"]["temperature_0"]["tiny"]  # the drafter alone
    # the same greedy tokens (lossless): the outputs' digests agree; sampled outputs differ
    greedy = report["results"]["temperature_0"]["tiny"]
    assert windowed["results"]["temperature_0"]["tiny"]["outputs_sha256"] == greedy["outputs_sha256"]
    assert report["results"]["temperature_1"]["tiny"]["outputs_sha256"] != greedy["outputs_sha256"]
