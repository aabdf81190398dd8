"""What would torch.compile buy the CPU decode step? A probe, not the serving path (issue 30).

    python -m dspark_serve.loadtest.probe_compile [--threads 2] [--out docs/benchmarks/compile-probe.json]

The default model in bfloat16 with its packed int4 projections and int8 head. A decode-only forward
(one new token per sequence: what a plain decode step runs) written as a pure function of tensors:
the paged context is gathered from the real KV pool, the new token's K/V is overlaid on the
gathered copy inside the function and written to the pool after it (an in-graph write to the pool
makes inductor copy the pool: seconds per call). Eager against `torch.compile` (inductor,
dynamic shapes, `emulate_precision_casts` so that fused elementwise chains round like eager) at
batch 1 and 8 over a 200-token context: compile seconds, ms per forward, whether the logits are
bit-identical to eager, and whether a sequence's logits are the same in every batch (batch
invariance). Random KV contents; the numbers are about time and arithmetic, not text.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine


def decode_forward(model, kv: torch.Tensor):
    """f(input_ids [B], positions [B], gather [B, C], newpos [B], mask [B, C]) -> (logits [B, V],
    new K/V per layer [L, 2B, Hkv, D]); `gather` holds the pool slots of each context."""
    from dspark_serve.models import quant
    from dspark_serve.models.llama import apply_rope

    def mm(x, layer):
        p = quant.packed_of(layer)
        out = p.mm(x) if p is not None else F.linear(x, layer.weight)
        return out if layer.bias is None else out + layer.bias

    def forward(input_ids, positions, gather, newpos, mask):
        h = model.embed_tokens(input_ids)
        cos, sin = model.rotary(positions, h.dtype)
        n = h.shape[0]
        b, c = gather.shape
        flat = gather.reshape(-1)
        news = []
        for i, layer in enumerate(model.layers):
            a = layer.self_attn
            nh, nkv, hd = a.num_heads, a.num_kv_heads, a.head_dim
            qkv = mm(layer.input_layernorm(h), a.qkv_proj)
            v = qkv[:, a.q_size + a.kv_size:].view(n, nkv, hd)
            qk = apply_rope(qkv[:, :a.q_size + a.kv_size].view(n, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
            kk = kv[i, 0].index_select(0, flat).index_copy(0, newpos, k).view(b, c, nkv, hd).transpose(1, 2)
            vv = kv[i, 1].index_select(0, flat).index_copy(0, newpos, v).view(b, c, nkv, hd).transpose(1, 2)
            s = torch.matmul(q.reshape(b, nkv, nh // nkv, hd), kk.transpose(-1, -2))
            s = s.float().mul(a.scale).masked_fill(~mask.view(b, 1, 1, c), float("-inf"))
            o = torch.matmul(s.softmax(-1).to(vv.dtype), vv).reshape(n, a.q_size)
            h = h + mm(o, a.o_proj)
            gu = mm(layer.post_attention_layernorm(h), layer.mlp.gate_up_proj)
            inter = layer.mlp.inter
            h = h + mm(F.silu(gu[:, :inter]) * gu[:, inter:], layer.mlp.down_proj)
            news.append(torch.cat((k, v)))
        return model.compute_logits(h), torch.stack(news)

    return forward


def inputs(batch: int, ctx: int, row0_ctx: int, slots_per_seq: int):
    """Sequence b owns pool slots [b * slots_per_seq, ...); row 0 is the same sequence in every batch."""
    lens = torch.tensor([row0_ctx] + [ctx] * (batch - 1))
    width = int(lens.max())
    ids = torch.randint(0, 1000, (batch,), generator=torch.Generator().manual_seed(0))
    pos = lens - 1
    gather = torch.arange(batch)[:, None] * slots_per_seq + torch.arange(width)[None]
    newpos = torch.arange(batch) * width + pos
    mask = torch.arange(width)[None] < lens[:, None]
    return ids, pos, gather, newpos, mask


def timed(f, args, reps: int) -> tuple[float, torch.Tensor]:
    with torch.inference_mode():
        f(*args)
        t0 = time.perf_counter()
        for _ in range(reps):
            logits, _ = f(*args)
    return (time.perf_counter() - t0) / reps * 1e3, logits


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default=str(OUT_DIR / "compile-probe.json"))
    args = ap.parse_args(argv)
    import torch._inductor.config as inductor_config

    from dspark_serve.engine import LLM

    inductor_config.emulate_precision_casts = True
    llm = LLM(dtype="bfloat16", num_threads=args.threads, speculative_config={"method": "none"},
              enable_prefix_caching=False)
    model, kv = llm.engine.runner.model, llm.engine.runner.kv
    with torch.inference_mode():
        kv.normal_(generator=torch.Generator().manual_seed(0))
    eager = decode_forward(model, kv)
    compiled = torch.compile(eager, fullgraph=True, dynamic=True)
    rows, first = [], {}
    for batch in (1, 8):
        a = inputs(batch, 200, 200, 512)
        ms_eager, ref = timed(eager, a, args.reps)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(*a)
        compile_s = time.perf_counter() - t0
        ms_comp, got = timed(compiled, a, args.reps)
        first[batch] = got[0]
        rows.append({"batch": batch, "context": 200, "eager_ms": ms_eager, "compiled_ms": ms_comp,
                     "speedup": ms_eager / ms_comp, "first_call_s": compile_s,
                     "bit_identical_to_eager": bool(torch.equal(ref, got)),
                     "max_abs_logit_diff": float((ref.float() - got.float()).abs().max())})
        print(rows[-1], flush=True)
    result = {"command": "python -m dspark_serve.loadtest.probe_compile", "machine": _machine(), "threads": args.threads,
              "dtype": "bfloat16", "quantization": model.quantization, "rows": rows,
              "row0_batch_invariant": bool(torch.equal(first[1], first[8]))}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
