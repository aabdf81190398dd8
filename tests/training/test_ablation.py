"""`dspark ablation-report`: gains against the first arm, only datasets every arm served, JSON + PNG."""

from __future__ import annotations

import json

import pytest

from dspark_serve.server.cli import main
from dspark_serve.training.ablation import ablation_table, load_arm, markdown_table


def fake_run(root, name, steps, val_tau, served: dict[str, float]):
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({
        "info": {"steps_done": steps, "train_s": 600.0, "trainable_params": 1000},
        "val": {"tv": 0.8, "tau_greedy": val_tau, "greedy_pos": [0.3, 0.2, 0.1], "tv_pos": [0.7, 0.8, 0.9]},
    }))
    results = {name_: {"rounds": 100, "tau": tau, "positions": [
        {"k": 1, "n": 100, "acceptance": tau - 1.0}, {"k": 2, "n": 10, "acceptance": 0.5},
        {"k": 3, "n": 0, "acceptance": None}]} for name_, tau in served.items()}
    (run / "eval" / "eval.json").write_text(json.dumps({
        "num_prompts": 20, "max_tokens": 128, "results": {"temperature_0": results}}))
    return run


def test_gains_are_relative_to_the_first_arm_over_the_datasets_all_arms_served(tmp_path):
    none = load_arm(fake_run(tmp_path, "none", 600, 1.25, {"gsm8k": 1.30, "mbpp": 1.20, "extra": 1.9}))
    markov = load_arm(fake_run(tmp_path, "markov", 540, 1.50, {"gsm8k": 1.43, "mbpp": 1.32}))
    table = ablation_table({"none": none, "markov": markov})
    assert table["baseline"] == "none"
    assert table["datasets"] == ["gsm8k", "mbpp"]  # 'extra' only served by one arm
    base, row = table["rows"]
    assert base["val_gain"] == pytest.approx(0.0) and base["served"]["gsm8k"]["gain"] == pytest.approx(0.0)
    assert row["val_gain"] == pytest.approx(0.2)
    assert row["steps_ratio"] == pytest.approx(0.9)
    assert row["served"]["gsm8k"]["gain"] == pytest.approx(1.43 / 1.30 - 1)
    assert row["served"]["mbpp"]["gain"] == pytest.approx(0.1)
    assert row["served_mean_gain"] == pytest.approx((1.43 + 1.32) / (1.30 + 1.20) - 1)
    md = markdown_table(table)
    assert "| markov | 540 | 1.500 | +20.0% | 1.430 (+10.0%) | 1.320 (+10.0%) | +10.0% |" in md


def test_cli_writes_json_and_plot_and_rejects_bad_arms(tmp_path, capsys):
    a = fake_run(tmp_path, "a", 10, 1.1, {"gsm8k": 1.2})
    b = fake_run(tmp_path, "b", 12, 1.2, {"gsm8k": 1.3})
    out = tmp_path / "report"
    assert main(["ablation-report", "--arm", f"none={a}", "--arm", f"vanilla={b}", "--out", str(out)]) == 0
    result = json.loads((out / "ablation.json").read_text())
    assert [r["arm"] for r in result["table"]["rows"]] == ["none", "vanilla"]
    assert (out / "ablation.png").stat().st_size > 1000
    assert "| vanilla | 12 |" in capsys.readouterr().out
    # a label used twice, a run without its eval report
    assert main(["ablation-report", "--arm", f"x={a}", "--arm", f"x={b}", "--out", str(out)]) == 2
    (b / "eval" / "eval.json").unlink()
    assert main(["ablation-report", "--arm", f"none={a}", "--arm", f"vanilla={b}", "--out", str(out)]) == 2
    with pytest.raises(SystemExit):
        main(["ablation-report", "--arm", "no-equals-sign", "--out", str(out)])
