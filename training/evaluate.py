"""`dspark eval-drafter`: real speculative decoding on prompt sets, and what the paper plots.

For each prompt file (JSONL `{"turns": [...]}`, first turn; or `{"prompt": ...}`) and each
temperature, the engine serves the prompts with the drafter at a FIXED verification length
gamma (no draft skipping, no online calibration), recording every verification round's
confidence logits and accepted count. From those rounds:

- tau: tokens per verification round including the bonus token (the paper's Table 1 metric);
- per-position conditional acceptance P(x_k accepted | x_1..x_{k-1} accepted) (Fig. 2);
- reliability of the confidence head per position, raw and after STS calibration, with ECE and
  ROC AUC (Fig. 6);
- the static-threshold sweep (Fig. 5): verifying while the calibrated c_k >= t, the tokens per
  round and the verified drafts per round for each t. With fixed-gamma rounds this is exact
  offline: a prefix of length l accepts min(a, l) drafts, the same events.

Writes one JSON and PNG plots to --out.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

THRESHOLDS = tuple(round(x, 2) for x in np.linspace(0.05, 0.95, 19))


def load_prompts(path: str | Path, num: int) -> list[str]:
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            text = rec.get("prompt") or (rec.get("turns") or [None])[0]
            if isinstance(text, str) and text.strip():
                out.append(text)
            if len(out) >= num:
                break
    return out


def auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """ROC AUC by the rank statistic (ties share their mean rank)."""
    pos, neg = labels > 0.5, labels <= 0.5
    n1, n0 = int(pos.sum()), int(neg.sum())
    if n1 == 0 or n0 == 0:
        return None
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    s = scores[order]
    i = 0
    while i < len(s):  # average ranks over ties
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def analyse_rounds(logits: np.ndarray, accepted: np.ndarray, verified: np.ndarray, calibrator=None) -> dict:
    """Everything eval-drafter reports, from recorded rounds (logits [N, gamma])."""
    from dspark_serve.scheduler.calibration import ece, reliability

    n, gamma = logits.shape
    res: dict = {"rounds": int(n), "tau": float((accepted + 1).mean()) if n else None,
                 "mean_verified": float(verified.mean()) if n else None}
    cond, rel_raw, rel_cal = [], [], []
    raw = 1.0 / (1.0 + np.exp(-logits))
    cal = calibrator.apply(logits) if calibrator is not None else None
    for k in range(1, gamma + 1):
        obs = (verified >= k) & (accepted >= k - 1)  # position k was reached and judged
        y = (accepted[obs] >= k).astype(np.float64)
        entry = {"k": k, "n": int(obs.sum()), "acceptance": float(y.mean()) if y.size else None,
                 "mean_confidence": float(raw[obs, k - 1].mean()) if y.size else None,
                 "auc": auc(raw[obs, k - 1], y) if y.size else None}
        rel_raw.append(reliability(raw[obs, k - 1], y) if y.size else None)
        entry["ece_raw"] = ece(raw[obs, k - 1], y) if y.size else None
        if cal is not None:  # one entry per position (None where no round reached it)
            rel_cal.append(reliability(cal[obs, k - 1], y) if y.size else None)
            entry["ece_calibrated"] = ece(cal[obs, k - 1], y) if y.size else None
        cond.append(entry)
    res["positions"] = cond
    res["reliability_raw"] = rel_raw
    if cal is not None:
        res["reliability_calibrated"] = rel_cal
    conf = cal if cal is not None else raw
    sweep = []
    full = verified >= gamma
    if full.any():
        c, a = conf[full], accepted[full]
        for t in THRESHOLDS:
            below = c < t
            l = np.where(below.any(1), below.argmax(1), gamma)  # verify while c_k >= t
            got = np.minimum(a, l)
            sweep.append({"threshold": t, "tokens_per_round": float((got + 1).mean()),
                          "verified_per_round": float(l.mean()),
                          "acceptance_rate": float(got.sum() / max(l.sum(), 1))})
    res["threshold_sweep"] = sweep
    return res


def run_set(llm_factory, prompts: list[str] | list[list[int]], temperature: float, max_tokens: int, seed: int) -> dict:
    """Serve `prompts` (user messages, or chat-templated token ids) once with recording on;
    returns the raw rounds and timing."""
    from dspark_serve.engine import SamplingParams
    from dspark_serve.engine.acceptance_log import read_rounds

    with tempfile.TemporaryDirectory() as tmp:
        rec = os.path.join(tmp, "rounds.jsonl")
        llm = llm_factory(rec)
        params = [SamplingParams(temperature=temperature, max_tokens=max_tokens, seed=seed + i) for i in range(len(prompts))]
        t0 = time.monotonic()
        if prompts and isinstance(prompts[0], str):
            outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        else:
            outs = llm.generate(prompts, params)
        wall = time.monotonic() - t0
        rounds = read_rounds(rec)
    gen = sum(len(o.outputs[0].token_ids) for o in outs)
    # one digest of every output's token ids, in prompt order: two runs (before and after a
    # refactor, say) produced identical outputs exactly when their digests agree
    digest = hashlib.sha256(json.dumps([list(o.outputs[0].token_ids) for o in outs]).encode()).hexdigest()
    return {"logits": rounds.logits, "accepted": rounds.accepted, "verified": rounds.verified,
            "lookup_accepted": rounds.lookup_accepted, "lookup_verified": rounds.lookup_verified,
            "generated_tokens": gen, "wall_s": wall, "outputs_sha256": digest}


def with_lookup(res: dict, r: dict) -> dict:
    """`res` (analyse_rounds of the drafter's rounds) with tau over ALL rounds when context lookup
    drafted some: tau is what serving got; drafter_tau and lookup describe the two sources."""
    la = r["lookup_accepted"]
    if not la.size:
        return res
    n_d = len(r["accepted"])
    res["drafter_tau"] = res["tau"]
    res["lookup"] = {"rounds": int(la.size), "share": float(la.size / (la.size + n_d)),
                     "tau": float((la + 1).mean()), "mean_verified": float(r["lookup_verified"].mean())}
    res["tau"] = float((np.concatenate([r["accepted"], la]) + 1).mean())
    res["rounds"] = int(n_d + la.size)
    return res


def spec_llm_factory(drafter: str, model: str | None, dtype: str, max_num_seqs: int, num_threads: int | None,
                     seed: int, gamma: int | None = None, context_window: int | None = None,
                     prompt_lookup_max: int | None = None):
    """LLMs that verify a FIXED gamma every round (no skipping, no online calibration), recording rounds.
    Context lookup follows the serving default unless `prompt_lookup_max` is given (0: the drafter alone)."""
    from dspark_serve.engine import LLM
    from dspark_serve.engine.engine import EngineConfig

    spec = {"method": "dspark", "model": drafter, "verification": "fixed", "draft_skipping": False,
            "online_calibration": False, "reproducible_seeds": False}  # seeded samples speculate too
    if gamma:
        spec["num_speculative_tokens"] = gamma
    if context_window is not None:
        spec["draft_context_window"] = context_window
    if prompt_lookup_max is not None:
        spec["prompt_lookup_max"] = prompt_lookup_max

    def factory(rec_path):
        return LLM.from_config(EngineConfig(model=model, dtype=dtype, max_num_seqs=max_num_seqs,
                                            max_num_batched_tokens=2048, num_threads=num_threads,
                                            speculative_config=spec, record_acceptance=rec_path, seed=seed))

    return factory


def calibrate_drafter(drafter: str, data: str, num_prompts: int = 64, max_tokens: int = 128,
                      temperatures=(0.0, 1.0), model: str | None = None, dtype: str = "float32",
                      max_num_seqs: int = 16, num_threads: int | None = None, seed: int = 0) -> dict:
    """STS on the held-out split of a gen-data dataset: serve its validation prompts with the
    drafter (fixed gamma, at each temperature), fit the temperatures on all recorded rounds and
    write calibration.json beside the drafter."""
    from dspark_serve.scheduler.calibration import STSCalibrator

    from .data import validation_prompts

    prompts = validation_prompts(data, num_prompts)
    if not prompts:
        raise SystemExit(f"{data} has no validation sequences to calibrate on")
    # the confidences are the drafter's: fit them on rounds the drafter drafted, at every context
    factory = spec_llm_factory(drafter, model, dtype, max_num_seqs, num_threads, seed, prompt_lookup_max=0)
    runs = [run_set(factory, prompts, t, max_tokens, seed) for t in temperatures]
    gamma = max(r["logits"].shape[1] for r in runs)
    logits = np.concatenate([np.pad(r["logits"], ((0, 0), (0, gamma - r["logits"].shape[1]))) for r in runs])
    accepted = np.concatenate([r["accepted"] for r in runs])
    verified = np.concatenate([r["verified"] for r in runs])
    cal = STSCalibrator().fit(logits, accepted, verified)
    out = Path(drafter) / "calibration.json"
    cal.to_json(out)
    return {"rounds": int(len(accepted)), "prompts": len(prompts), "temperatures": cal.temperatures,
            "ece_before": cal.ece_before, "ece_after": cal.ece_after, "file": str(out)}


def eval_drafter(drafter: str, datasets: dict[str, str], out: str, num_prompts: int = 40, max_tokens: int = 256,
                 temperatures=(0.0, 1.0), gamma: int | None = None, model: str | None = None, dtype: str = "float32",
                 max_num_seqs: int = 16, seed: int = 0, num_threads: int | None = None,
                 context_window: int | None = None, prompt_lookup_max: int | None = None) -> dict:
    from dspark_serve.scheduler.calibration import STSCalibrator

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    cal_file = Path(drafter) / "calibration.json"
    calibrator = STSCalibrator.from_json(cal_file) if cal_file.exists() else None
    factory = spec_llm_factory(drafter, model, dtype, max_num_seqs, num_threads, seed, gamma, context_window,
                               prompt_lookup_max)
    if context_window is None:
        context_window = json.loads((Path(drafter) / "config.json").read_text()).get("draft_context_window")
    if prompt_lookup_max is None:
        from dspark_serve.engine.speculative import SpecConfig
        prompt_lookup_max = SpecConfig.prompt_lookup_max
    report = {"drafter": os.path.abspath(drafter), "num_prompts": num_prompts, "max_tokens": max_tokens,
              "dtype": dtype, "draft_context_window": context_window or None, "prompt_lookup_max": prompt_lookup_max,
              "calibration": str(cal_file) if calibrator else None, "results": {}}
    for temp in temperatures:
        key = f"temperature_{temp:g}"
        report["results"][key] = {}
        for name, path in datasets.items():
            prompts = load_prompts(path, num_prompts)
            r = run_set(factory, prompts, temp, max_tokens, seed)
            res = with_lookup(analyse_rounds(r["logits"], r["accepted"], r["verified"], calibrator), r)
            res.update({"prompts": len(prompts), "generated_tokens": r["generated_tokens"],
                        "outputs_sha256": r["outputs_sha256"], "wall_s": round(r["wall_s"], 1)})
            report["results"][key][name] = res
            log.info("%s %s: tau %.3f over %d rounds", key, name, res["tau"] or 0, res["rounds"])
            # after every set: a run stopped part-way keeps what it measured
            (out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out_dir / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    plot_report(report, out_dir)
    return report


def summary_table(report: dict) -> list[dict]:
    rows = []
    for key, sets in report["results"].items():
        for name, res in sets.items():
            rows.append({"temperature": key, "dataset": name, "tau": round(res["tau"], 3) if res["tau"] else None,
                         "rounds": res["rounds"], "acceptance_by_position": [
                             None if p["acceptance"] is None else round(p["acceptance"], 3) for p in res["positions"]]})
            if "lookup" in res:
                rows[-1].update({"drafter_tau": round(res["drafter_tau"], 3) if res["drafter_tau"] else None,
                                 "lookup_share": round(res["lookup"]["share"], 3),
                                 "lookup_tau": round(res["lookup"]["tau"], 3)})
    return rows


def plot_report(report: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, sets in report["results"].items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, res in sets.items():
            ks = [p["k"] for p in res["positions"]]
            axes[0].plot(ks, [p["acceptance"] for p in res["positions"]], marker="o", label=f"{name} (tau {res['tau']:.2f})")
            sw = res["threshold_sweep"]
            if sw:
                axes[1].plot([s["verified_per_round"] for s in sw], [s["tokens_per_round"] for s in sw], marker=".", label=name)
        axes[0].set(xlabel="draft position k", ylabel="P(accept k | accepted < k)", title=f"Conditional acceptance ({key})",
                    ylim=(0, 1))
        axes[1].set(xlabel="verified drafts per round", ylabel="tokens per round",
                    title="Static-threshold sweep (t = 0.05 .. 0.95)")
        for ax in axes:
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"acceptance-{key}.png", dpi=110)
        plt.close(fig)

        # reliability per position, all sets pooled by weighting bins with their counts
        first = next(iter(sets.values()))
        gamma = len(first["positions"])
        fig, axes = plt.subplots(1, gamma, figsize=(2.4 * gamma, 2.8), sharey=True)
        for k in range(gamma):
            ax = axes[k] if gamma > 1 else axes
            for kind, style in (("reliability_raw", "o-"), ("reliability_calibrated", "s--")):
                conf_sum = acc_sum = None
                for res in sets.values():
                    rel = (res.get(kind) or [None] * gamma)[k]
                    if rel is None:
                        continue
                    c = np.array([0 if x is None else x for x in rel["confidence"]]) * np.array(rel["count"])
                    a = np.array([0 if x is None else x for x in rel["accuracy"]]) * np.array(rel["count"])
                    n = np.array(rel["count"])
                    conf_sum = (c, a, n) if conf_sum is None else tuple(x + y for x, y in zip(conf_sum, (c, a, n)))
                if conf_sum is None:
                    continue
                c, a, n = conf_sum
                keep = n > 0
                label = "raw" if kind == "reliability_raw" else "STS"
                ax.plot(c[keep] / n[keep], a[keep] / n[keep], style, ms=3, label=label)
            ax.plot([0, 1], [0, 1], color="gray", lw=0.8)
            ax.set(title=f"k={k + 1}", xlabel="confidence", xlim=(0, 1), ylim=(0, 1))
            if k == 0:
                ax.set_ylabel("acceptance")
                ax.legend(fontsize=7)
        fig.suptitle(f"Confidence reliability per position ({key})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / f"reliability-{key}.png", dpi=110)
        plt.close(fig)
