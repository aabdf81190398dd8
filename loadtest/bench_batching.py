"""Continuous-batching decode throughput of the engine on ShareGPT, against an earlier revision
of this repository, in ONE run on one machine.

The workload is what `dspark gen-data` and a loaded server do: `--slots` sequences decode at
once and a finished one is replaced by the next ShareGPT prompt (<= `--max-prompt-tokens`
tokens; its prefill joins a step of decodes), greedy, up to `--max-tokens` new tokens, until
`--requests` have finished. Each variant runs in its own process, one after the other
(`--rounds` times, interleaved), with the same prompts, dtype and torch threads:

- `current`: this working tree;
- `current, DSPARK_MALLOC_TUNING=0`: without the glibc malloc tuning (engine/cpu_alloc.py);
- `REV` (`--baseline REV`): a `git worktree` of that revision, same interpreter.

Writes docs/benchmarks/NAME.json, NAME.md and NAME.png.

    python -m dspark_serve.loadtest.bench_batching --baseline 660304e [--requests 120] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT_DIR = ROOT / "docs" / "benchmarks"


def worker(args) -> dict:
    """One variant: run the workload in this process, print a JSON line."""
    import torch

    from dspark_serve.engine import LLM, SamplingParams, apply_chat_template
    from dspark_serve.training.sharegpt import sharegpt_pairs, sharegpt_path

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.slots, max_num_batched_tokens=2048,
              num_threads=args.threads)
    eng = llm.engine
    prompts = []
    with open(sharegpt_path()) as f:
        for _, text, _ in sharegpt_pairs(f):
            ids = apply_chat_template(eng.tokenizer, [{"role": "user", "content": text}])
            if len(ids) <= args.max_prompt_tokens:
                prompts.append(ids)
            if len(prompts) >= args.requests + args.slots:
                break
    it = iter(prompts)
    running: set[str] = set()
    admitted = finished = out_tokens = 0
    step_s: list[float] = []
    t0 = time.perf_counter()
    while finished < args.requests:
        while len(running) < args.slots and admitted < len(prompts):
            rid = f"r{admitted}"
            eng.add_request(rid, params=SamplingParams(temperature=0.0, max_tokens=args.max_tokens),
                            prompt_token_ids=next(it))
            running.add(rid)
            admitted += 1
        t = time.perf_counter()
        outs = eng.step()
        step_s.append(time.perf_counter() - t)
        for o in outs:
            if o.finished and o.request_id in running:
                running.discard(o.request_id)
                finished += 1
                out_tokens += len(o.outputs[0].token_ids)
    wall = time.perf_counter() - t0
    step_s.sort()
    return {"requests": finished, "output_tokens": out_tokens, "wall_s": wall,
            "output_tokens_per_s": out_tokens / wall, "steps": len(step_s),
            "mean_step_ms": 1e3 * sum(step_s) / len(step_s), "median_step_ms": 1e3 * step_s[len(step_s) // 2],
            "p90_step_ms": 1e3 * step_s[int(0.9 * len(step_s))], "dtype": str(eng.runner.dtype).replace("torch.", ""),
            "torch": torch.__version__}


def _run_variant(cwd: Path, env_extra: dict, args) -> dict:
    env = dict(os.environ, **env_extra)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--requests", str(args.requests),
           "--slots", str(args.slots), "--threads", str(args.threads), "--dtype", args.dtype,
           "--max-tokens", str(args.max_tokens), "--max-prompt-tokens", str(args.max_prompt_tokens)]
    if args.model:
        cmd += ["--model", args.model]
    # The worker script comes from the working tree (an older revision may not have it); the
    # engine it imports comes from `cwd`, first on the path.
    env["PYTHONPATH"] = str(cwd) + os.pathsep + str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"variant in {cwd} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default=None, help="git revision to compare with (a worktree in a temp dir)")
    ap.add_argument("--requests", type=int, default=120)
    ap.add_argument("--slots", type=int, default=64, help="sequences decoding at once")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--max-prompt-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--name", default="batching")
    ap.add_argument("--out", default=str(OUT_DIR))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0

    variants: list[tuple[str, Path, dict]] = []
    tmp = None
    if args.baseline:
        tmp = Path(tempfile.mkdtemp(prefix="dspark-baseline-"))
        subprocess.run(["git", "worktree", "add", "--detach", str(tmp / "tree"), args.baseline], cwd=ROOT,
                       check=True, capture_output=True)
        variants.append((f"{args.baseline}", tmp / "tree", {"DSPARK_MALLOC_TUNING": "0"}))
    variants += [("current, DSPARK_MALLOC_TUNING=0", ROOT, {"DSPARK_MALLOC_TUNING": "0"}), ("current", ROOT, {})]
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in variants}
    try:
        for r in range(args.rounds):
            for name, cwd, env in variants:
                res = _run_variant(cwd, env, args)
                runs[name].append(res)
                print(f"round {r + 1} {name}: {res['output_tokens_per_s']:.0f} output tok/s, "
                      f"mean step {res['mean_step_ms']:.0f} ms", flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tmp / "tree")], cwd=ROOT, capture_output=True)
    from dspark_serve.loadtest.bench_engine import _machine

    def med(name, key):
        vals = sorted(x[key] for x in runs[name])
        return vals[len(vals) // 2]

    base = variants[0][0]
    result = {
        "benchmark": "continuous-batching decode throughput on ShareGPT (prefills join decode steps)",
        "command": "python -m dspark_serve.loadtest.bench_batching "
                   + " ".join(argv if argv is not None else sys.argv[1:]),
        "requests": args.requests, "slots": args.slots, "max_tokens": args.max_tokens,
        "max_prompt_tokens": args.max_prompt_tokens, "threads": args.threads, "dtype": args.dtype,
        "rounds": args.rounds, "machine": _machine(), "runs": runs,
        "median": {n: {k: med(n, k) for k in ("output_tokens_per_s", "mean_step_ms", "median_step_ms", "p90_step_ms")}
                   for n in runs},
    }
    result["ratio_over_first"] = {n: result["median"][n]["output_tokens_per_s"] / result["median"][base]["output_tokens_per_s"]
                                  for n in runs}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    rows = "\n".join(
        f"| {n} | {result['median'][n]['output_tokens_per_s']:.0f} | {result['ratio_over_first'][n]:.2f}x | "
        f"{result['median'][n]['mean_step_ms']:.0f} | {result['median'][n]['median_step_ms']:.0f} | "
        f"{result['median'][n]['p90_step_ms']:.0f} |" for n in runs)
    m = result["machine"]
    (out / f"{args.name}.md").write_text(f"""# Continuous batching on ShareGPT: this tree against {base}

Command: `{result['command']}`. {args.slots} sequences decode at once; a finished one is
replaced by the next ShareGPT prompt (<= {args.max_prompt_tokens} tokens), whose prefill joins a
step of decodes; greedy, up to {args.max_tokens} new tokens, {args.requests} requests per
variant, {args.rounds} round(s) interleaved, medians shown. {args.dtype}, {args.threads} torch threads.
Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}.

| variant | output tokens/s | ratio | mean step ms | median step ms | p90 step ms |
| --- | ---: | ---: | ---: | ---: | ---: |
{rows}
""")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        names = list(runs)
        ax.barh(names, [result["median"][n]["output_tokens_per_s"] for n in names], color="#4878a8")
        ax.set_xlabel("output tokens/s (higher is better)")
        ax.set_title(f"{args.slots} slots, ShareGPT, {args.dtype}, {args.threads} threads")
        fig.tight_layout()
        fig.savefig(out / f"{args.name}.png", dpi=100)
    except ImportError:
        pass
    print(json.dumps(result["median"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
