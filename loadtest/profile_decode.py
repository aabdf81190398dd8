"""Where a plain decode step of our engine spends its time (a benchmark, not a test).

Runs the engine on the default model (or --model) with plain greedy decoding at each --batch
size, profiles the decode steps with torch.profiler, and reports per batch: wall time per step,
the time inside torch operators (self CPU time, summed) and what is left, which is Python,
scheduling and framework overhead between the operators, plus the operators that cost most.
This is the profile that explains a gap to llama.cpp: its per-token time compared with ours
split into matrix products (kernels and weight format), attention/KV work and overhead.

    python -m dspark_serve.loadtest.profile_decode [--dtype bfloat16] [--threads 2] [--batch 1 8]

Writes docs/benchmarks/profile-decode.json and profile-decode.md (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, PROMPTS, _machine

# Operator families for the summary (by aten name); everything else is "other ops".
FAMILIES = {
    "matmul (linear / lm_head)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention (SDPA)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
    "KV cache gather / scatter": ("aten::index", "aten::index_select", "aten::index_put", "aten::gather",
                                  "aten::scatter", "aten::copy_", "aten::cat"),
    "sampling (topk / argmax / softmax)": ("aten::topk", "aten::argmax", "aten::softmax", "aten::_softmax",
                                           "aten::sort", "aten::multinomial"),
}


def _family(name: str) -> str:
    for fam, prefixes in FAMILIES.items():
        if name.startswith(prefixes):
            return fam
    return "other ops"


def profile_batch(llm, prompts_ids, batch: int, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from dspark_serve.engine import SamplingParams

    eng = llm.engine
    p = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    for i in range(batch):
        eng.add_request(f"prof{batch}-{i}", params=p, prompt_token_ids=prompts_ids[i % len(prompts_ids)])
    for _ in range(4):  # prefill (chunked or not) and a few warm decode steps, outside the profile
        eng.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        wall = time.perf_counter() - t0
    while eng.has_unfinished_requests():
        eng.step()
    # Self time of the leaf operators only: nested aten calls would otherwise count twice.
    per_op = defaultdict(float)
    for ev in prof.key_averages():
        if ev.key.startswith("aten::") and ev.self_cpu_time_total > 0:
            per_op[ev.key] += ev.self_cpu_time_total / 1e6
    op_total = sum(per_op.values())
    fams = defaultdict(float)
    for name, t in per_op.items():
        fams[_family(name)] += t
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    ms = 1e3 / steps
    return {
        "batch": batch, "steps": steps,
        "wall_ms_per_step": wall * ms,
        "op_ms_per_step": op_total * ms,
        "overhead_ms_per_step": max(0.0, wall - op_total) * ms,
        "families_ms_per_step": {k: v * ms for k, v in sorted(fams.items(), key=lambda kv: -kv[1])},
        "top_ops_ms_per_step": {k: v * ms for k, v in top},
        "tokens_per_s": batch * steps / wall,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=48, help="decode steps profiled per batch size")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)

    from dspark_serve.engine import LLM
    from dspark_serve.engine.llm import apply_chat_template

    llm = LLM(model=args.model, dtype=args.dtype, num_threads=args.threads,
              speculative_config={"method": "none"})
    tok = llm.get_tokenizer()
    prompts_ids = [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in PROMPTS]
    dtype = str(llm.engine.runner.dtype).removeprefix("torch.")
    rows = [profile_batch(llm, prompts_ids, b, args.steps) for b in args.batch]
    result = {"command": "python -m dspark_serve.loadtest.profile_decode " + " ".join(argv or sys.argv[1:]),
              "machine": _machine(), "dtype": dtype, "threads": torch.get_num_threads(), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile-decode.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["# Where a plain decode step spends its time", "",
             f"Command: `{result['command']}`; {result['machine']['cpu']}, {dtype}, "
             f"{result['threads']} torch threads, commit {result['machine']['commit']}.", "",
             "| batch | wall ms/step | in torch ops | overhead (Python, scheduling) | tokens/s | "
             + " | ".join(FAMILIES) + " | other ops |",
             "| ---: | ---: | ---: | ---: | ---: | " + " | ".join("---:" for _ in FAMILIES) + " | ---: |"]
    for r in rows:
        f = r["families_ms_per_step"]
        lines.append(f"| {r['batch']} | {r['wall_ms_per_step']:.1f} | {r['op_ms_per_step']:.1f} | "
                     f"{r['overhead_ms_per_step']:.1f} ({100 * r['overhead_ms_per_step'] / r['wall_ms_per_step']:.0f}%) | "
                     f"{r['tokens_per_s']:.1f} | "
                     + " | ".join(f"{f.get(k, 0.0):.1f}" for k in FAMILIES) + f" | {f.get('other ops', 0.0):.1f} |")
    lines += ["", "Top operators (self CPU ms per step):", ""]
    for r in rows:
        lines.append(f"- batch {r['batch']}: " + ", ".join(f"{k} {v:.2f}" for k, v in r["top_ops_ms_per_step"].items()))
    (out / "profile-decode.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
