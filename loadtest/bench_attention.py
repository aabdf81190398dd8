"""The paged-attention kernel against the gather-then-matmul path, per layer, in ONE run.

    python -m dspark_serve.loadtest.bench_attention [--threads 2] [--reps 20] [--dtype bfloat16|float32]

For each (sequences, context length, queries per sequence) of the grid: one layer's attention
of the default model's shape (9 query heads, 3 KV heads, head_dim 64, a bf16 or float32 pool,
16-token blocks handed out of order) as the compiled decode step calls it (`overlay_attention`: the new
tokens' K/V beside the pool), with ``torch.ops.dspark.paged_attention`` and with the torch path
(gather each context into a padded batch, two matmuls). Contexts within a point vary (the
longest is the given length, the others down to half of it), as a serving batch's do. Reports
milliseconds per layer, their ratio, and the largest difference of the two outputs.

Writes docs/benchmarks/attention.json, .md and .png (--out to name another).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine, write_results

GRID = [(1, 512, 1), (1, 512, 8), (1, 4096, 1), (8, 512, 1), (8, 512, 4), (32, 256, 1), (32, 1024, 1),
        (32, 1024, 3), (64, 1024, 1)]
BS = 16


def _case(nseq: int, ctx: int, nq: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16):
    from dspark_serve.models.attention import decode_inputs

    g = torch.Generator().manual_seed(seed)
    clens = [max(nq, ctx - (i * 37) % max(1, ctx // 2)) for i in range(nseq)]
    nblk = [-(-c // BS) for c in clens]
    perm = torch.randperm(sum(nblk), generator=g).tolist()
    tables, used = [], 0
    for n in nblk:
        tables.append(perm[used:used + n])
        used += n
    kc = torch.randn(sum(nblk) * BS, 3, 64, generator=g).to(dtype)
    vc = torch.randn(sum(nblk) * BS, 3, 64, generator=g).to(dtype)
    n = nseq * nq
    q = torch.randn(n, 9, 64, generator=g).to(dtype)
    k = torch.randn(n, 3, 64, generator=g).to(dtype)
    v = torch.randn(n, 3, 64, generator=g).to(dtype)
    return q, k, v, kc, vc, decode_inputs([nq] * nseq, clens, tables, BS, torch.device("cpu"))


def _time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def measure(grid, reps: int, dtype: torch.dtype = torch.bfloat16) -> list[dict]:
    import dspark_serve.models.attention as A

    points = []
    for nseq, ctx, nq in grid:
        q, k, v, kc, vc, inp = _case(nseq, ctx, nq, dtype=dtype)
        out, ms = {}, {}
        for name, flag in (("kernel", True), ("torch", False), ("kernel ", True)):  # kernel timed twice, around
            A._PAGED[:] = [flag]
            key = name.strip()
            t = _time(lambda: A.overlay_attention(q, k, v, kc, vc, inp, 0.125), reps)
            ms[key] = min(t, ms.get(key, t))
            out[key] = A.overlay_attention(q, k, v, kc, vc, inp, 0.125)
        p = {"sequences": nseq, "context": ctx, "queries": nq, "kernel_ms": ms["kernel"], "torch_ms": ms["torch"],
             "speedup": ms["torch"] / ms["kernel"],
             "max_abs_diff": float((out["kernel"].float() - out["torch"].float()).abs().max())}
        points.append(p)
        print(p, flush=True)
    return points


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        "# Paged attention: our kernel against the gather-then-matmul path",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}; {res['threads']} torch "
        f"threads; kernel build {res.get('isa', 'avx512')}. One layer of the default model's shape (9 query heads, "
        f"3 KV heads, head_dim 64, {res.get('dtype', 'bfloat16')} pool, "
        f"16-token blocks), as the compiled decode step calls it; contexts of a point run from the given length "
        f"down to half of it. Best of two timings of the kernel (one before and one after the torch path).",
        "",
        "| sequences | longest context | queries / sequence | kernel ms / layer | torch ms / layer | speedup | max abs diff |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for p in res["points"]:
        lines.append(f"| {p['sequences']} | {p['context']} | {p['queries']} | {p['kernel_ms']:.3f} | {p['torch_ms']:.3f} | "
                     f"{p['speedup']:.1f}x | {p['max_abs_diff']:.4f} |")
    lines += ["", "The default model has 30 layers: multiply by 30 for a step's attention. Differences: the kernel "
              "keeps scores and the softmax in float32 and rounds once; the torch path computes the scores and "
              "the probabilities in the pool's dtype (in bf16 it rounds them; in float32 the two differ only by "
              "their order of summation).", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = res["points"]
    labels = [f"{p['sequences']}x{p['context']}\nq={p['queries']}" for p in pts]
    x = range(len(pts))
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.bar([i - 0.2 for i in x], [p["torch_ms"] for p in pts], width=0.4, label="gather + matmul (torch)")
    ax.bar([i + 0.2 for i in x], [p["kernel_ms"] for p in pts], width=0.4, label="paged_attention kernel")
    ax.set_yscale("log")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("ms per layer")
    ax.set_xlabel("sequences x longest context, queries per sequence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the pool's dtype")
    ap.add_argument("--out", default=str(OUT_DIR / "attention.json"))
    args = ap.parse_args(argv)
    from dspark_serve.models import kernels

    if not kernels.load():
        raise SystemExit(f"the kernels are not available here: {kernels.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    import sys

    res = {"command": "python -m dspark_serve.loadtest.bench_attention " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": _machine(), "threads": args.threads, "dtype": args.dtype, "isa": kernels.isa(),
           "points": measure(GRID, args.reps, getattr(torch, args.dtype))}
    write_results(Path(args.out), res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
