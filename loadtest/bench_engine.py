"""Plain-decoding speed of our engine against transformers `generate`, in ONE run.

Same model (the embedded default unless --model), same dtype, same prompts,
same torch thread count, same number of new tokens (EOS ignored by both):

- concurrency 1: each prompt alone, one after the other (tokens/s of a single stream);
- concurrency 8: ours runs the 8 requests at once (continuous batching);
  transformers is measured generating them one after the other (its sequential
  throughput) and, for reference, as one padded batch.

Writes docs/benchmarks/engine.json, engine.md and engine.png.

    python -m dspark_serve.loadtest.bench_engine [--threads 2] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a transformer neural network works.",
    "What are the health benefits of regular exercise?",
    "Describe the water cycle for a school report.",
    "Give me a recipe for a vegetable soup.",
    "Why is the sky blue? Explain in detail.",
    "Write a letter to a friend about a trip to the mountains.",
    "Compare Python and JavaScript for a beginner.",
]

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(), "commit": commit}


def write_results(out: Path, res: dict, markdown, plot=None) -> None:
    """A benchmark's results: `out` (.json), its .md (and its .png when it has a plot), the markdown printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    text = markdown(res)
    out.with_suffix(".md").write_text(text)
    if plot is not None:
        plot(res, out.with_suffix(".png"))
    print(text)


def bench_ours(model, dtype, threads, prompts_ids, new_tokens):
    from dspark_serve.engine import LLM, SamplingParams

    llm = LLM(model=model, dtype=dtype, num_threads=threads)
    p = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts_ids[0], SamplingParams(temperature=0.0, max_tokens=8))  # warm-up
    t0 = time.perf_counter()
    n1 = sum(len(llm.generate(ids, p)[0].outputs[0].token_ids) for ids in prompts_ids)
    single = n1 / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    outs = llm.generate(prompts_ids, p)
    n8 = sum(len(o.outputs[0].token_ids) for o in outs)
    batch = n8 / (time.perf_counter() - t0)
    dtype_name = str(llm.engine.runner.dtype).replace("torch.", "")
    del llm
    return {"c1_tokens_per_s": single, "c8_tokens_per_s": batch, "dtype": dtype_name}


def bench_hf(model_path, torch_dtype, prompts_ids, new_tokens):
    from transformers import AutoModelForCausalLM

    if model_path.endswith(".gguf"):
        hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(model_path), gguf_file=os.path.basename(model_path), dtype=torch_dtype)
    else:
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch_dtype)
    hf.eval()
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def gen(ids):
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), **kw)
        return out.shape[1] - x.shape[1]

    gen(prompts_ids[0][:8])  # warm-up
    t0 = time.perf_counter()
    n = sum(gen(ids) for ids in prompts_ids)
    sequential = n / (time.perf_counter() - t0)
    # one padded batch (left padding), for reference
    width = max(len(i) for i in prompts_ids)
    x = torch.tensor([[0] * (width - len(i)) + i for i in prompts_ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in prompts_ids])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(x, attention_mask=mask, **kw)
    batched = (out.shape[1] - width) * len(prompts_ids) / (time.perf_counter() - t0)
    return {"c1_tokens_per_s": sequential, "sequential_tokens_per_s": sequential, "batched8_tokens_per_s": batched}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF directory or .gguf (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads for both engines")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)

    from dspark_serve.engine import apply_chat_template
    from dspark_serve.models.loader import default_model_path, load_model, resolve_dtype

    torch.set_num_threads(args.threads)
    model_path = args.model or default_model_path()
    torch_dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    tok = load_model(model_path, "float32").tokenizer
    prompts_ids = [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in PROMPTS]

    ours = bench_ours(args.model, args.dtype, args.threads, prompts_ids, args.new_tokens)
    hf = bench_hf(model_path, torch_dtype, prompts_ids, args.new_tokens)
    result = {
        "benchmark": "plain decoding, engine vs transformers generate",
        "command": "python -m dspark_serve.loadtest.bench_engine " + " ".join(argv or []),
        "model": os.path.basename(model_path),
        "dtype": ours["dtype"],
        "threads": args.threads,
        "new_tokens": args.new_tokens,
        "prompts": len(PROMPTS),
        "machine": _machine(),
        "ours": ours,
        "transformers": hf,
        "ratios": {
            "c1_ours_over_hf": ours["c1_tokens_per_s"] / hf["c1_tokens_per_s"],
            "c8_ours_over_hf_sequential": ours["c8_tokens_per_s"] / hf["sequential_tokens_per_s"],
            "c8_ours_over_hf_batched": ours["c8_tokens_per_s"] / hf["batched8_tokens_per_s"],
        },
        "goals": {"c1_ours_over_hf": 1.3, "c8_ours_over_hf_sequential": 3.0},
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine.json").write_text(json.dumps(result, indent=2) + "\n")
    r = result["ratios"]
    md = f"""# Engine vs transformers `generate` (plain decoding)

Command: `{result['command'].strip()}` (one run, same machine, model, dtype, prompts and
torch threads for both). Model {result['model']}, {result['dtype']}, {args.threads} torch threads,
{len(PROMPTS)} chat prompts, {args.new_tokens} new tokens each (EOS ignored), greedy.
Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, torch {result['machine']['torch']},
commit {result['machine']['commit']}.

| | ours tokens/s | transformers tokens/s | ratio | goal |
| --- | ---: | ---: | ---: | ---: |
| concurrency 1 (one stream at a time) | {ours['c1_tokens_per_s']:.1f} | {hf['c1_tokens_per_s']:.1f} | {r['c1_ours_over_hf']:.2f}x | 1.3x |
| concurrency 8 vs transformers sequential | {ours['c8_tokens_per_s']:.1f} | {hf['sequential_tokens_per_s']:.1f} | {r['c8_ours_over_hf_sequential']:.2f}x | 3x |
| concurrency 8 vs transformers padded batch of 8 | {ours['c8_tokens_per_s']:.1f} | {hf['batched8_tokens_per_s']:.1f} | {r['c8_ours_over_hf_batched']:.2f}x | |

Tokens/s count generated tokens over wall time including prefill (prompts are 30-45 tokens).
"""
    (out / "engine.md").write_text(md)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = ["c=1", "c=8"]
        ax.bar([0 - 0.2, 1 - 0.2], [ours["c1_tokens_per_s"], ours["c8_tokens_per_s"]], width=0.4, label="dspark-serve engine")
        ax.bar([0 + 0.2, 1 + 0.2], [hf["c1_tokens_per_s"], hf["sequential_tokens_per_s"]], width=0.4, label="transformers generate (sequential)")
        ax.set_xticks([0, 1], labels)
        ax.set_ylabel("generated tokens/s")
        ax.set_title(f"{result['model']} {result['dtype']}, {args.threads} threads")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "engine.png", dpi=100)
    except ImportError:
        pass
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
