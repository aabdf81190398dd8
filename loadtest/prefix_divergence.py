"""Does a prefix-cache hit change greedy output? Against chunked prefill, which moves the same boundary.

    python -m dspark_serve.loadtest.prefix_divergence [docs/benchmarks/prefix-divergence.json]

The default model (plain decoding), 8 ShareGPT questions behind one shared system prompt of 300
words, each request run alone after the one before (so from the second on, the system prompt's
blocks are cached), 64 greedy tokens (ignore_eos). Per dtype (float32, bfloat16), three engines:
prefix caching off with whole-prompt prefill (the reference), caching on, and caching off with
64-token prefill chunks. Prints and writes how many outputs differ from the reference, and where.
"""

from __future__ import annotations

from argparse import Namespace

from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template
from dspark_serve.loadtest.bench_spec import _drive, divergence, write_json_result
from dspark_serve.loadtest.workloads import build_workload

NUM = 8


def requests(tokenizer) -> list:
    args = Namespace(dataset="sharegpt-system-prompt", seed=0, tokenizer="approx", dataset_path=None,
                     max_input_len=256, max_total_len=1024, max_tokens=64, system_prompt_words=300)
    specs, _ = build_workload(args, NUM)
    p = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    return [(f"q{i}", apply_chat_template(tokenizer, s.messages), p) for i, s in enumerate(specs)]


def run(dtype: str, caching: bool, chunk: int, reqs) -> tuple[dict, LLMEngine]:
    eng = LLMEngine(EngineConfig(dtype=dtype, num_threads=2, speculative_config={"method": "none"},
                                 enable_prefix_caching=caching, max_num_batched_tokens=chunk))
    out = {}
    for r in reqs:  # one at a time: each later request finds the system prompt cached
        out.update(_drive(eng, [r]))
    return out, eng


def main() -> int:
    res = {"prompts": NUM, "max_tokens": 64}
    for dtype in ("float32", "bfloat16"):
        probe = LLMEngine(EngineConfig(dtype=dtype, num_threads=2, speculative_config={"method": "none"}))
        reqs = requests(probe.tokenizer)
        del probe
        ref, _ = run(dtype, False, 4096, reqs)
        row = {"prompt_tokens_mean": sum(len(ids) for _, ids, _ in reqs) / len(reqs)}
        for label, caching, chunk in (("caching on", True, 4096), ("64-token chunks", False, 64)):
            got, eng = run(dtype, caching, chunk, reqs)
            row[label] = divergence(ref, got)
            if caching:
                row[label].update(hit_tokens=eng.kv.prefix_hits, query_tokens=eng.kv.prefix_queries)
        res[dtype] = row
        print(dtype, row, flush=True)
    write_json_result(res, "docs/benchmarks/prefix-divergence.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
