"""Per-user speed floors (docs/scheduler.md, "Speed floors"): goodput of the floors against Algorithm 1
alone, fixed-length verification and plain decoding, over HTTP, in ONE run.

1. The single-stream speed S: tokens/s per user of the default server at concurrency 1 (median of
   `--single-stream-requests` ShareGPT requests), unless `--single-stream` gives it.
2. One interleaved sweep (`python -m dspark_serve.loadtest sweep --rounds N`): `off` (plain decoding), `fixed`
   (verify every draft), `scheduled` (the default: Algorithm 1, no floor) and one `sla-P` server per
   floor fraction P (`--sla-min-tokens-per-s P x S`), the same ShareGPT requests at each concurrency.
3. The same configurations under open-loop load: Poisson arrivals at each `--request-rates` rate (by
   default 60% and 90% of `scheduled`'s request throughput at the grid's highest concurrency, which
   also caps the requests in flight), interleaved rounds, one sweep per rate.
4. Per floor F and round: goodput = requests whose decode speed (1 / TPOT) reached F, per second,
   and their output tokens/s; the share of requests below F; total output tokens/s. Each point
   reports the medians over rounds and the median per-round ratios of `sla-P` to `scheduled`, and
   the issue's bar where `scheduled` missed F for over 10% of requests: `sla-P` at least 1.2x its
   goodput with output throughput within 5%.

Writes docs/benchmarks/sla.json, .md and .png (and the sweeps' own files, sla-sweep*.*).

    python -m dspark_serve.loadtest.bench_sla [--concurrency-grid 8,16,32] [--rounds 2] [--fractions 0.5,0.75]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dspark_serve.loadtest import report
from dspark_serve.loadtest.sweep import request_speeds, sweep_main

OUT_DIR = report.RESULTS_DIR
OFF = "--speculative-config '{\"method\": \"none\"}'"
FIXED = "--speculative-config '{\"verification\": \"fixed\"}'"


def goodput(requests: list, duration: float, floor: float) -> dict:
    """One round's goodput at a floor from its (tokens/s per user, output tokens) pairs."""
    good = [(s, n) for s, n in requests if s is not None and s >= floor]
    return {"requests_per_s": len(good) / duration, "output_tok_s": sum(n for _, n in good) / duration,
            "missed_share": 1.0 - len(good) / len(requests) if requests else None}


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _rounds(point: dict) -> list[dict]:
    """A sweep point's rounds (a one-round sweep keeps none: the point itself is its round)."""
    if "rounds" in point:
        return point["rounds"]
    s = point["summary"]
    return [{"output_token_throughput": s["output_token_throughput"], "duration_s": s["duration_s"],
             "requests": request_speeds(point)}]


def analyse(sweep: dict, floors: dict[str, float]) -> list[dict]:
    """Per floor and concurrency: each configuration's goodput and throughput (medians over rounds) and
    the per-round ratios of the floor's own server to `scheduled`; `request_rate` is the sweep's
    Poisson rate (None: closed loop)."""
    by_name = {c["name"]: c for c in sweep["configs"] if c.get("points")}
    out = []
    for label, floor in floors.items():
        names = [n for n in ("off", "fixed", "scheduled") if n in by_name] + [label]
        for point in by_name["scheduled"]["points"]:
            c = point["concurrency"]
            row = {"floor_label": label, "floor": floor, "concurrency": c, "request_rate": sweep.get("request_rate"),
                   "configs": {}}
            rounds_of = {}
            for name in names:
                p = next((q for q in by_name.get(name, {}).get("points", []) if q["concurrency"] == c), None)
                if p is None:
                    continue
                rs = [{"goodput": goodput(r["requests"], r["duration_s"], floor),
                       "throughput": r["output_token_throughput"]} for r in _rounds(p)]
                rounds_of[name] = rs
                engine = (p.get("server_metrics") or {}).get("engine") or {}
                row["configs"][name] = {
                    "admission_holds": engine.get("sla_admission_holds"),
                    "floor_draft_tokens": engine.get("sla_floor_draft_tokens"),
                    "goodput_requests_per_s": _median([r["goodput"]["requests_per_s"] for r in rs]),
                    "goodput_output_tok_s": _median([r["goodput"]["output_tok_s"] for r in rs]),
                    "missed_share": _median([r["goodput"]["missed_share"] for r in rs]),
                    "output_tok_s": _median([r["throughput"] for r in rs]),
                }
            if label in rounds_of and "scheduled" in rounds_of:
                pairs = list(zip(rounds_of[label], rounds_of["scheduled"]))
                row["sla_vs_scheduled"] = {
                    "goodput_requests": [_ratio(a["goodput"]["requests_per_s"], b["goodput"]["requests_per_s"])
                                         for a, b in pairs],
                    "goodput_tokens": [_ratio(a["goodput"]["output_tok_s"], b["goodput"]["output_tok_s"]) for a, b in pairs],
                    "throughput": [_ratio(a["throughput"], b["throughput"]) for a, b in pairs],
                }
                for k in list(row["sla_vs_scheduled"]):
                    row["sla_vs_scheduled"][k + "_median"] = _median(row["sla_vs_scheduled"][k])
                row["bar"] = bar(row["configs"]["scheduled"]["missed_share"], row["sla_vs_scheduled"],
                                 row["configs"][label]["goodput_requests_per_s"])
            out.append(row)
    return out


def bar(scheduled_missed: float | None, vs: dict, sla_goodput: float | None = None) -> str:
    """The issue's bar at one point: where `scheduled` missed the floor for over 10% of requests,
    the floor's server has at least 1.2x its goodput (requests) with output throughput within 5%."""
    if scheduled_missed is None or scheduled_missed <= 0.10:
        return "n/a"  # scheduled already meets the floor for 90% of requests
    g, t = vs.get("goodput_requests_median"), vs.get("throughput_median")
    if g is None:  # scheduled had no goodput at all: any is more
        return "met" if sla_goodput and t is not None and t >= 0.95 else "not met"
    return "met" if g is not None and t is not None and g >= 1.2 and t >= 0.95 else "not met"


def _load(row: dict) -> str:
    rate = row.get("request_rate")
    return str(row["concurrency"]) if not rate else f"{rate:.2f} req/s (<= {row['concurrency']})"


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def markdown(res: dict) -> str:
    lines = [
        "# Per-user speed floors: goodput against Algorithm 1 alone",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {res['machine'].get('cpu')}, {res['machine'].get('cores')} cores, commit "
        f"{(res['git'].get('commit') or '?')[:7]}{' (dirty)' if res['git'].get('dirty') else ''}. Single-stream speed S = "
        f"{res['single_stream']:.1f} tokens/s per user ({res['single_stream_source']}); floors "
        + ", ".join(f"`{k}` = {v:.1f} tok/s" for k, v in res["floors"].items())
        + f". {res['workload']}; {res['rounds']} interleaved rounds, medians over rounds.",
        "",
        "Goodput: requests whose decode speed (1 / TPOT, tokens/s after the first token) reached the "
        "floor, per second, and their output tokens/s. Missed: the share of requests below the floor. "
        "Ratios: medians of per-round ratios of the floor's server to `scheduled` (`-`: `scheduled` had "
        "no goodput to divide by).",
        "",
        "| floor | load: c, or Poisson rate (cap) | config | goodput req/s | goodput tok/s | missed | output tok/s "
        "| sla / scheduled: goodput req, tok, throughput | bar | holds, floor drafts (median round) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for row in res["points"]:
        for name, v in row["configs"].items():
            vs = row.get("sla_vs_scheduled") if name == row["floor_label"] else None
            ratio = "" if vs is None else ", ".join(_f(vs[k + "_median"], "{:.2f}x")
                                                     for k in ("goodput_requests", "goodput_tokens", "throughput"))
            lines.append(f"| {row['floor_label']} ({row['floor']:.0f}) | {_load(row)} | {name} | "
                         f"{_f(v['goodput_requests_per_s'], '{:.2f}')} | {_f(v['goodput_output_tok_s'])} | "
                         f"{_f(v['missed_share'], '{:.0%}')} | {_f(v['output_tok_s'])} | {ratio} | "
                         f"{row.get('bar', '') if vs is not None else ''} | "
                         f"{_f(v.get('admission_holds'), '{:.0f}')}, {_f(v.get('floor_draft_tokens'), '{:.0f}')} |")
    lines.append("")
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(res["floors"])
    fig, axes = plt.subplots(1, len(labels), figsize=(5 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        rows = [r for r in res["points"] if r["floor_label"] == label and not r.get("request_rate")]
        for name in rows[0]["configs"]:
            xs = [r["concurrency"] for r in rows if name in r["configs"]]
            ys = [r["configs"][name]["goodput_output_tok_s"] or 0.0 for r in rows if name in r["configs"]]
            ax.plot(xs, ys, "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel("goodput, output tokens/s")
        ax.set_title(f"floor {res['floors'][label]:.0f} tok/s per user ({label})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _common(args) -> list[str]:
    return ["--dataset", args.dataset, "--max-tokens", str(args.max_tokens), "--ignore-eos", "--temperature", "0",
            "--no-plots"]


def request_rates(spec: str, sweep: dict, cap: int) -> list[float]:
    """The open-loop rates: given, none, or (auto) 60% and 90% of `scheduled`'s request throughput at
    concurrency `cap` in the closed-loop sweep (its median round)."""
    if spec == "none":
        return []
    if spec != "auto":
        return [float(x) for x in spec.split(",")]
    sched = next(c for c in sweep["configs"] if c["name"] == "scheduled")
    point = next(p for p in sched.get("points", []) if p["concurrency"] == cap)
    return [f * float(point["summary"]["request_throughput"]) for f in (0.6, 0.9)]


def single_stream(args, out_dir: Path) -> float:
    """Median tokens/s per user of the default server at concurrency 1."""
    name = "sla-single-stream"
    sweep_main(["--name", name, "--result-dir", str(out_dir), *_common(args), "--concurrency-grid", "1",
                "--num-requests", str(args.single_stream_requests), "--config-name", "scheduled",
                *([f"--server-args={args.server_args}"] if args.server_args else [])])
    sweep = json.loads((out_dir / f"{name}.json").read_text())
    return float(sweep["configs"][0]["points"][0]["summary"]["tokens_per_s_per_user"]["p50"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency-grid", default="8,16,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--num-requests", type=int, default=32, help="requests per point (default 32)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dataset", default="sharegpt")
    ap.add_argument("--fractions", default="0.5,0.75", help="floors as fractions of the single-stream speed")
    ap.add_argument("--single-stream", type=float, default=None,
                    help="tokens/s per user at concurrency 1 (default: measured first)")
    ap.add_argument("--single-stream-requests", type=int, default=8)
    ap.add_argument("--request-rates", default="auto",
                    help="Poisson rates (req/s, comma-separated) for the open-loop sweeps; 'auto': 60%% and 90%% "
                         "of scheduled's request throughput at the highest concurrency; 'none': skip")
    ap.add_argument("--no-baselines", action="store_true", help="only scheduled and the floors (no off, fixed)")
    ap.add_argument("--server-args", default="", help="appended to every server's command line (e.g. --enforce-eager)")
    ap.add_argument("--result-dir", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    out_dir = Path(args.result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = "given"
    s = args.single_stream
    if s is None:
        s, source = single_stream(args, out_dir), f"measured: p50 of {args.single_stream_requests} requests at c = 1"
    floors = {f"sla-{round(100 * float(x))}": float(x) * s for x in args.fractions.split(",")}
    extra = f" {args.server_args}" if args.server_args else ""
    configs = [] if args.no_baselines else ["--config-name", "off", "--server-args", OFF + extra,
                                            "--config-name", "fixed", "--server-args", FIXED + extra]
    configs += ["--config-name", "scheduled", *([f"--server-args={args.server_args}"] if args.server_args else [])]
    for label, floor in floors.items():
        configs += ["--config-name", label, "--server-args", f"--sla-min-tokens-per-s {floor:.2f}{extra}"]
    sweep_name = "sla-sweep"
    sweep_main(["--name", sweep_name, "--result-dir", str(out_dir), *_common(args), "--concurrency-grid",
                args.concurrency_grid, "--rounds", str(args.rounds), "--num-requests", str(args.num_requests),
                "--baseline", "scheduled", *configs])
    sweep = json.loads((out_dir / f"{sweep_name}.json").read_text())
    points = analyse(sweep, floors)
    cap = max(int(c) for c in args.concurrency_grid.split(","))
    for rate in request_rates(args.request_rates, sweep, cap):
        name = f"{sweep_name}-rate-{rate:.2f}"
        sweep_main(["--name", name, "--result-dir", str(out_dir), *_common(args), "--concurrency-grid", str(cap),
                    "--request-rate", f"{rate:.4f}", "--rounds", str(args.rounds), "--num-requests",
                    str(args.num_requests), "--baseline", "scheduled", *configs])
        points += analyse(json.loads((out_dir / f"{name}.json").read_text()), floors)
    args_given = sys.argv[1:] if argv is None else argv
    res = {"command": " ".join(["python -m dspark_serve.loadtest.bench_sla", *args_given]), "machine": sweep["machine"],
           "git": sweep["git"], "single_stream": s, "single_stream_source": source, "floors": floors,
           "rounds": args.rounds,
           "workload": f"{args.dataset}, {args.num_requests} requests per point, {args.max_tokens} output tokens "
                       f"(EOS ignored, greedy)",
           "points": points}
    path = out_dir / "sla.json"
    report.write_json(path, res)
    (out_dir / "sla.md").write_text(markdown(res))
    plot(res, out_dir / "sla.png")
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
