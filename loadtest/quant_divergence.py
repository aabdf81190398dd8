"""How often greedy output with speculation differs from greedy output without it, with packed weights.

    python -m dspark_serve.loadtest.quant_divergence [OUT.json]          (default: docs/benchmarks/quantization-divergence.json)
    python -m dspark_serve.loadtest.quant_divergence --avx2 [OUT.json]   (default: docs/benchmarks/quantization-divergence-avx2.json)

The default model, 8 chat prompts at once, 128 greedy tokens each (ignore_eos), the default
speculative configuration against plain decoding. Without --avx2: bf16, three arithmetic modes:
packed with the 24-row limit (`--quantization auto`, the default), always packed
(DSPARK_PACKED_MAX_ROWS=0) and dense (`--quantization none`). With --avx2: what the default server
serves on an AVX2-only CPU, emulated on any CPU with AVX2: the AVX2 build of our kernel
(DSPARK_KERNEL_ISA=avx2, so no paged-attention kernel), `--dtype auto` choosing float32 as it does
on a CPU without bf16 arithmetic, `--quantization auto` packing it; and float32 dense beside it.
Prints and writes, per mode, how many outputs diverge and at which token, and each engine's
decode tokens/s (the 8 requests at once).
"""
import os
import sys
import time

AVX2 = "--avx2" in sys.argv
if AVX2:  # before the kernels load: the AVX2 build, and dtype auto as where bf16 is emulated
    os.environ["DSPARK_KERNEL_ISA"] = "avx2"
    os.environ.pop("DSPARK_CPU_DTYPE", None)

from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template  # noqa: E402
from dspark_serve.loadtest.bench_spec import PROMPTS, _drive, divergence  # noqa: E402
from dspark_serve.models import loader, quant  # noqa: E402


def _timed(engine, reqs) -> tuple[dict, float]:
    t0 = time.perf_counter()
    out = _drive(engine, reqs)
    return out, sum(map(len, out.values())) / (time.perf_counter() - t0)


def main() -> int:
    args = [a for a in sys.argv[1:] if a != "--avx2"]
    if AVX2:
        loader.cpu_has_bf16 = lambda: False  # the CPU being emulated computes bf16 in software
        modes = (("float32 auto (packed, AVX2 kernel)", "auto", "auto", 24), ("float32 dense", "float32", "none", 24))
    else:
        modes = (("auto, limit 24", "bfloat16", "auto", 24), ("auto, always packed", "bfloat16", "auto", 1 << 62),
                 ("none (dense)", "bfloat16", "none", 24))
    res = {}
    for label, dtype, q, limit in modes:
        quant.PACKED_MAX_ROWS = limit
        plain = LLMEngine(EngineConfig(dtype=dtype, quantization=q, num_threads=2, enforce_eager=True,
                                       speculative_config={"method": "none"}))
        tok = plain.tokenizer
        reqs = [(f"d{i}", apply_chat_template(tok, [{"role": "user", "content": p}]),
                 SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
        ref, plain_rate = _timed(plain, reqs)
        kinds = quant.kernel_of(plain.loaded.model)
        served = str(plain.runner.dtype)
        del plain
        spec = LLMEngine(EngineConfig(dtype=dtype, quantization=q, num_threads=2, enforce_eager=True))
        got, spec_rate = _timed(spec, reqs)
        res[label] = {**divergence(ref, got), "dtype": served, "packed": kinds,
                      "plain_tok_s": round(plain_rate, 1), "dspark_tok_s": round(spec_rate, 1)}
        print(label, res[label], flush=True)
    out = args[0] if args else ("docs/benchmarks/quantization-divergence-avx2.json" if AVX2
                                else "docs/benchmarks/quantization-divergence.json")
    import json

    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
