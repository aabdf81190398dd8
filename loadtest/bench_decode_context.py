"""How the decode step's time grows with the context: the weights vs the attention.

A decode step reads every weight once whatever the context, and every sequence's K/V once per
layer. Where the attention reads K/V straight from the paged pool (our paged-attention kernel:
AVX-512 and AVX2 builds, bf16 and float32 pools) the second term is small at these contexts; where
it gathers each sequence's context into a padded copy per layer and calls SDPA (the portable torch
path: no kernel, or DSPARK_ATTENTION_KERNEL=torch), it can dominate the step. This benchmark times the engine's decode forward as the
server runs it (`--dtype auto`, compiled step, plain decoding) on dummy inputs, for a grid of
(sequences, context length); each point is the median of `--reps` calls, and the slope per
sequence and context token is what the attention costs.

Writes docs/benchmarks/decode-context[-NAME].json and .md.

    python -m dspark_serve.loadtest.bench_decode_context [--sequences 1,16,32] [--contexts 32,300,1000] [--name avx2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine, write_results


def time_point(runner, nseq: int, ctx: int, reps: int) -> float | None:
    """Median seconds of the decode forward for `nseq` sequences of `ctx` context tokens (None when
    the pool is too small)."""

    step = runner.decode_step
    bs = step.block_size
    nblk = -(-ctx // bs)
    if nseq * nblk > runner.kv.shape[2] // bs:
        return None
    tables = [list(range(i * nblk, (i + 1) * nblk)) for i in range(nseq)]
    inputs = step.inputs([1] * nseq, [ctx] * nseq, tables)
    ids, sel = torch.zeros(nseq, dtype=torch.long), torch.arange(nseq)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(ids, inputs, sel)  # reads the pool, writes nothing (the caller writes the new K/V)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slopes(points: list[dict]) -> dict[str, float]:
    """Per number of sequences: microseconds per (sequence x context token) between its shortest and longest
    context, and the share of the longest context's step that is context-dependent."""
    out = {}
    by_seq: dict[int, list[dict]] = {}
    for p in points:
        by_seq.setdefault(p["sequences"], []).append(p)
    for n, ps in sorted(by_seq.items()):
        ps = sorted(ps, key=lambda p: p["context"])
        if len(ps) < 2:
            continue
        lo, hi = ps[0], ps[-1]
        slope = (hi["ms"] - lo["ms"]) / (n * (hi["context"] - lo["context"]))
        out[str(n)] = {"us_per_seq_ctx_token": 1000 * slope,
                       "context_share_at_longest": (hi["ms"] - lo["ms"]) / hi["ms"]}
    return out


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Decode step time against context length", "", f"`{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}; "
             f"{res['threads']} torch threads, dtype {res['dtype']}, packed kernels {res['kernel']}, "
             f"attention {res['attention']}; plain decoding, {res.get('step', 'compiled step')}, median of {res['reps']} calls.", "",
             "| sequences | context | step ms |", "| ---: | ---: | ---: |"]
    lines += [f"| {p['sequences']} | {p['context']} | {p['ms']:.1f} |" for p in res["points"]]
    lines += ["", "| sequences | us per (sequence x context token), all layers | context-dependent share at the longest context |",
              "| ---: | ---: | ---: |"]
    lines += [f"| {n} | {s['us_per_seq_ctx_token']:.2f} | {s['context_share_at_longest']:.0%} |"
              for n, s in res["slopes"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sequences", default="1,16,32")
    ap.add_argument("--contexts", default="32,300,1000")
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="suffix of the output files")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    from dspark_serve.loadtest.bench_load_aware import _kernel
    from dspark_serve.loadtest.bench_structured import _engine

    llm = _engine({"method": "none"}, args.threads)
    runner = llm.engine.runner
    if runner.decode_step is None:
        raise SystemExit("this model has no compiled decode step")
    points = []
    for n in (int(x) for x in args.sequences.split(",")):
        for c in (int(x) for x in args.contexts.split(",")):
            s = time_point(runner, n, c, args.reps)
            if s is not None:
                points.append({"sequences": n, "context": c, "ms": 1000 * s})
                print(points[-1], flush=True)
    res = {"command": "python -m dspark_serve.loadtest.bench_decode_context " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": _machine(), "threads": args.threads, "reps": args.reps,
           "dtype": str(runner.dtype).replace("torch.", ""), "kernel": _kernel(llm),
           "attention": _attention(runner),
           "step": "compiled step" if runner.decode_step.why_eager is None else f"eager step ({runner.decode_step.why_eager})", "points": points, "slopes": slopes(points)}
    name = f"decode-context-{args.name}" if args.name else "decode-context"
    write_results(OUT_DIR / f"{name}.json", res, markdown)
    return 0


def _attention(runner) -> str:
    """Which attention the decode step runs (models/attention.py's rule)."""
    from dspark_serve.models.attention import kernel_serves

    if kernel_serves(runner.kv.dtype, runner.kv.shape[-1]):
        return "paged-attention kernel"
    return "gather + SDPA (torch)"


if __name__ == "__main__":
    raise SystemExit(main())
