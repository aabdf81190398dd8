"""How often greedy output with speculation differs from greedy output without it, with packed weights.

    python -m dspark_serve.loadtest.quant_divergence [docs/benchmarks/quantization-divergence.json]

The default model in bf16, 8 chat prompts at once, 128 greedy tokens each (ignore_eos), the default
speculative configuration against plain decoding, three arithmetic modes: packed with the 24-row
limit (`--quantization auto`, the default), always packed (DSPARK_PACKED_MAX_ROWS=0) and dense
(`--quantization none`). Prints and writes, per mode, how many outputs diverge and at which token.
"""
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template
from dspark_serve.loadtest.bench_spec import PROMPTS, _drive, divergence, write_json_result
from dspark_serve.models import quant

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
        res[label] = divergence(ref, got)
        print(label, res[label], flush=True)
    write_json_result(res, "docs/benchmarks/quantization-divergence.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
