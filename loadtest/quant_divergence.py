"""How often greedy output with speculation differs from greedy output without it, with packed weights.

    python -m loadtest.quant_divergence [docs/benchmarks/quantization-divergence.json]

The default model in bf16, 8 chat prompts at once, 128 greedy tokens each (ignore_eos), the default
speculative configuration against plain decoding, three arithmetic modes: packed with the 24-row
limit (`--quantization auto`, the default), always packed (DSPARK_PACKED_MAX_ROWS=0) and dense
(`--quantization none`). Prints and writes, per mode, how many outputs diverge and at which token.
"""
import json
import sys

from engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template
from loadtest.bench_spec import PROMPTS, _drive
from models import quant

def main() -> int:
    res = {}
    for label, q, limit in (("auto, limit 24", "auto", 24), ("auto, always packed", "auto", 1 << 62), ("none (dense)", "none", 24)):
        quant.PACKED_MAX_ROWS = limit
        plain = LLMEngine(EngineConfig(dtype="bfloat16", quantization=q, num_threads=2, speculative_config={"method": "none"}))
        tok = plain.tokenizer
        reqs = [(f"d{i}", apply_chat_template(tok, [{"role": "user", "content": p}]),
                 SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
        ref = _drive(plain, reqs)
        del plain
        spec = LLMEngine(EngineConfig(dtype="bfloat16", quantization=q, num_threads=2))
        got = _drive(spec, reqs)
        first = {rid: next((k for k, (x, y) in enumerate(zip(ref[rid], got[rid])) if x != y), None) for rid, _, _ in reqs}
        res[label] = {"prompts": len(reqs), "diverged": sum(v is not None for v in first.values()),
                      "first_divergence": {k: v for k, v in first.items() if v is not None}}
        print(label, res[label], flush=True)
    out = sys.argv[1] if len(sys.argv) > 1 else "docs/benchmarks/quantization-divergence.json"
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
