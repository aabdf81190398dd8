"""How often greedy output with speculation differs from greedy output without it, with packed weights.

    python -m dspark_serve.loadtest.quant_divergence [OUT.json]          (default: docs/benchmarks/quantization-divergence.json)
    python -m dspark_serve.loadtest.quant_divergence --avx2 [OUT.json]   (default: docs/benchmarks/quantization-divergence-avx2.json)
    python -m dspark_serve.loadtest.quant_divergence --compiled [OUT.json] (default: docs/benchmarks/quantization-divergence-compiled.json)

The default model, 8 chat prompts at once, 128 greedy tokens each (ignore_eos), plain decoding
against two speculative configurations: the default one (`dspark serve`'s: the embedded drafter
with context lookup and the load-aware policy) and fixed 7-token verification with lookup off
(a block verified at every step). Each records how many drafted tokens it verified; the steps run
eager (`--enforce-eager`) unless --compiled. Without --avx2: bf16, three arithmetic modes: packed
with the layout's row limit (`--quantization auto`, the default), always packed
(DSPARK_PACKED_MAX_ROWS=0) and dense (`--quantization none`). With --avx2: what the default server
serves on an AVX2-only CPU, emulated on any CPU with AVX2: the AVX2 build of our kernels
(DSPARK_KERNEL_ISA=avx2), `--dtype auto` choosing float32 as it does
on a CPU without bf16 arithmetic, `--quantization auto` packing it; and float32 dense beside it.
With --compiled: the server's own configuration on this CPU (`--dtype auto`, `--quantization
auto`, the compiled step, every graph compiled before the prompts run), the same comparisons.
Prints and writes, per mode, how many outputs diverge and at which token, and each engine's
decode tokens/s (the 8 requests at once).
"""
import os
import sys
import time

AVX2 = "--avx2" in sys.argv
COMPILED = "--compiled" in sys.argv
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


def default_spec() -> dict:
    """The speculative configuration `dspark serve` gives the default model (as server/cli.py's
    default_speculative_config does: the embedded drafter, every other setting its default). An
    EngineConfig without one decodes plainly, which is what this script used to compare with
    plain decoding until 2026-12-07 (its earlier files measured plain against plain)."""
    path = loader.default_drafter_path()
    assert path, "this install has no embedded drafter"
    return {"method": "dspark", "model": path}


FIXED7 = {"num_speculative_tokens": 7, "verification": "fixed", "draft_skipping": False, "prompt_lookup_max": 0}


def _engine(dtype: str, q: str, spec: dict, eager: bool = True) -> LLMEngine:
    engine = LLMEngine(EngineConfig(dtype=dtype, quantization=q, num_threads=2, enforce_eager=eager,
                                    speculative_config=spec))
    step = engine.runner.decode_step
    if not eager and step is not None and step.why_eager is None:
        assert step.wait(7200), step.describe()
    return engine


def _compare(ref: dict, reqs, engine: LLMEngine) -> dict:
    """`engine`'s greedy outputs against `ref`, with what its speculation did (a speculative
    engine that verified no drafted token would compare plain decoding with itself)."""
    before = engine.stats.snapshot()
    got, rate = _timed(engine, reqs)
    after = engine.stats.snapshot()
    spent = {k: after[k] - before[k] for k in ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens")}
    if engine.runner.proposer is None or spent["spec_num_draft_tokens"] == 0:
        raise SystemExit(f"the speculative engine verified no drafted token ({spent}): nothing was compared")
    return {**divergence(ref, got), "dspark_tok_s": round(rate, 1), "drafted_tokens_verified": spent["spec_num_draft_tokens"],
            "accepted_tokens": spent["spec_num_accepted_tokens"], "verification_rounds": spent["spec_num_drafts"]}


def _requests(tok) -> list:
    return [(f"d{i}", apply_chat_template(tok, [{"role": "user", "content": p}]),
             SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)) for i, p in enumerate(PROMPTS)]


def main() -> int:
    args = [a for a in sys.argv[1:] if a not in ("--avx2", "--compiled")]
    if COMPILED:
        return compiled(args[0] if args else "docs/benchmarks/quantization-divergence-compiled.json")
    if AVX2:
        loader.cpu_has_bf16 = lambda: False  # the CPU being emulated computes bf16 in software
        modes = (("float32 auto (packed, AVX2 kernel)", "auto", "auto", None), ("float32 dense", "float32", "none", None))
    else:
        modes = (("auto, layout's row limit", "bfloat16", "auto", None), ("auto, always packed", "bfloat16", "auto", 1 << 62),
                 ("none (dense)", "bfloat16", "none", None))
    res = {"command": "python -m dspark_serve.loadtest.quant_divergence " + " ".join(sys.argv[1:])}
    for label, dtype, q, limit in modes:
        quant.PACKED_MAX_ROWS = limit
        plain = _engine(dtype, q, {"method": "none"})
        reqs = _requests(plain.tokenizer)
        ref, plain_rate = _timed(plain, reqs)
        kinds = quant.kernel_of(plain.loaded.model)
        served = str(plain.runner.dtype)
        del plain
        for name, spec in (("default", default_spec()), ("fixed 7, lookup off", {**default_spec(), **FIXED7})):
            engine = _engine(dtype, q, spec)
            res[f"{label}: {name}"] = {**_compare(ref, reqs, engine), "dtype": served, "packed": kinds,
                                       "plain_tok_s": round(plain_rate, 1)}
            print(label, name, res[f"{label}: {name}"], flush=True)
            del engine
    out = args[0] if args else ("docs/benchmarks/quantization-divergence-avx2.json" if AVX2
                                else "docs/benchmarks/quantization-divergence.json")
    _write(out, res)
    return 0


def _write(out: str, res: dict) -> None:
    import json

    with open(out, "w") as f:
        json.dump(res, f, indent=1)


def compiled(out: str) -> int:
    """Plain against speculative greedy output, every engine compiled as the server runs it."""
    from dspark_serve.models.attention import kernel_serves

    plain = _engine("auto", "auto", {"method": "none"}, eager=False)
    reqs = _requests(plain.tokenizer)
    ref, plain_rate = _timed(plain, reqs)
    kv = plain.runner.kv
    res = {"command": "python -m dspark_serve.loadtest.quant_divergence " + " ".join(sys.argv[1:]),
           "dtype": str(plain.runner.dtype), "packed": quant.kernel_of(plain.loaded.model),
           "paged_attention_kernel": kernel_serves(kv.dtype, kv.shape[-1]),
           "step": plain.runner.decode_step.describe(), "plain_tok_s": round(plain_rate, 1)}
    del plain, kv
    for label, spec in (("default", default_spec()), ("fixed 7, lookup off", {**default_spec(), **FIXED7})):
        engine = _engine("auto", "auto", spec, eager=False)
        res[label] = {**_compare(ref, reqs, engine), "step": engine.runner.decode_step.describe()}
        print(label, res[label], flush=True)
        del engine
    _write(out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
