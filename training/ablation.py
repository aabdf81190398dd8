"""`dspark ablation-report`: the sequential-head ablation as one table (our own Table 1) and one plot.

Each arm is a `train-drafter` run directory (its `summary.json`: steps, held-out TV and greedy agreement
per position) with an `eval-drafter` report in `RUN/eval/eval.json` (served tau per dataset). The first
arm is the baseline the gains are relative to (DFlash-style `none` in `make drafter-ablation`).
"""

from __future__ import annotations

import json
from pathlib import Path


def load_arm(run_dir: str | Path, temperature: str = "temperature_0") -> dict:
    run = Path(run_dir)
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "eval" / "eval.json").read_text())
    info, val = summary["info"], summary["val"]
    served = {}
    for name, res in report["results"].get(temperature, {}).items():
        served[name] = {
            "tau": res["tau"], "rounds": res["rounds"],
            "acceptance": [p["acceptance"] for p in res["positions"]],
            "n": [p["n"] for p in res["positions"]],
        }
    return {
        "run": str(run), "steps": info["steps_done"], "train_s": info["train_s"],
        "trainable_params": info["trainable_params"], "val_tv": val["tv"], "val_tau_greedy": val["tau_greedy"],
        "val_greedy_pos": val["greedy_pos"], "val_tv_pos": val["tv_pos"],
        "served": served, "num_prompts": report["num_prompts"], "max_tokens": report["max_tokens"],
    }


def ablation_table(arms: dict[str, dict]) -> dict:
    """Gains of every arm over the first one: held-out tau and served tau per dataset, as ratios."""
    labels = list(arms)
    if not labels:
        raise ValueError("no arms")
    base = arms[labels[0]]
    datasets = [d for d in base["served"] if all(d in a["served"] for a in arms.values())]
    rows = []
    for label in labels:
        a = arms[label]
        row = {"arm": label, "steps": a["steps"], "val_tau_greedy": a["val_tau_greedy"],
               "val_gain": a["val_tau_greedy"] / base["val_tau_greedy"] - 1.0,
               "steps_ratio": a["steps"] / base["steps"], "served": {}}
        for d in datasets:
            tau, btau = a["served"][d]["tau"], base["served"][d]["tau"]
            row["served"][d] = {"tau": tau, "gain": None if not (tau and btau) else tau / btau - 1.0}
        taus = [a["served"][d]["tau"] for d in datasets if a["served"][d]["tau"]]
        btaus = [base["served"][d]["tau"] for d in datasets if base["served"][d]["tau"]]
        row["served_mean_tau"] = sum(taus) / len(taus) if taus else None
        row["served_mean_gain"] = (row["served_mean_tau"] / (sum(btaus) / len(btaus)) - 1.0) if taus and btaus else None
        rows.append(row)
    return {"baseline": labels[0], "datasets": datasets, "rows": rows}


def markdown_table(table: dict) -> str:
    ds = table["datasets"]
    head = ["arm", "steps", "held-out tau_greedy", "gain"] + [f"{d} tau (gain)" for d in ds] + ["mean served gain"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    for r in table["rows"]:
        cells = [r["arm"], str(r["steps"]), f"{r['val_tau_greedy']:.3f}", f"{100 * r['val_gain']:+.1f}%"]
        for d in ds:
            s = r["served"][d]
            cells.append("-" if s["tau"] is None else f"{s['tau']:.3f} ({100 * (s['gain'] or 0):+.1f}%)")
        g = r["served_mean_gain"]
        cells.append("-" if g is None else f"{100 * g:+.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_ablation(arms: dict[str, dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, a in arms.items():
        ks = range(1, len(a["val_greedy_pos"]) + 1)
        axes[0].plot(ks, a["val_greedy_pos"], marker="o", label=f"{label} (tau {a['val_tau_greedy']:.3f})")
    axes[0].set(xlabel="draft position k", ylabel="greedy agreement with the target",
                title="Held-out, teacher-forced, every anchor", ylim=(0, None))
    ds = table["datasets"]
    width = 0.8 / max(1, len(arms))
    x = np.arange(len(ds))
    for i, (label, a) in enumerate(arms.items()):
        axes[1].bar(x + i * width, [a["served"][d]["tau"] or 0 for d in ds], width, label=label)
    axes[1].set_xticks(x + width * (len(arms) - 1) / 2, ds)
    lo = min((a["served"][d]["tau"] or 1.0) for a in arms.values() for d in ds)
    axes[1].set(ylabel="tau (tokens per round)", title="Served, temperature 0, gamma 7", ylim=(max(1.0, lo - 0.1), None))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ablation_report(runs: dict[str, str], out: str | Path, name: str = "ablation") -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    arms = {label: load_arm(run) for label, run in runs.items()}
    table = ablation_table(arms)
    result = {"arms": arms, "table": table}
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    plot_ablation(arms, table, out / f"{name}.png")
    return result
