"""The compiled decode step in the engine against --enforce-eager (issue 30, part 2).

    python -m dspark_serve.loadtest.bench_compile [--threads 2] [--rounds 2] [--out docs/benchmarks/compile.json]

The default model in bfloat16 (packed int4 projections, int8 head), plain decoding and DSpark,
each as two engines in this process: one compiling its decode graphs (waited for before any
timing; the seconds per graph are reported, with whether inductor's cache was warm) and one with
`enforce_eager`. The same greedy chat prompts (128 tokens each, ignore_eos) at concurrency 1
(one request at a time) and 8 (all submitted together), the engines interleaved per round.
Reports decode tokens/s, the compiled / eager ratio, and whether every output is token-identical.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, PROMPTS, _machine


def _engine(spec: dict | None, eager: bool, threads: int):
    from dspark_serve.engine import LLM

    kw = {} if spec is None else {"speculative_config": spec}
    return LLM(dtype="bfloat16", num_threads=threads, enforce_eager=eager, **kw)


def _run(llm, prompts, concurrency: int, max_tokens: int) -> tuple[list[list[int]], float, int]:
    from dspark_serve.engine import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    msgs = [[{"role": "user", "content": p}] for p in prompts]
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(msgs), concurrency):
        outs += llm.chat(msgs[i:i + concurrency], params)
    seconds = time.perf_counter() - t0
    ids = [o.outputs[0].token_ids for o in outs]
    return ids, seconds, sum(len(t) for t in ids)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--out", default=str(OUT_DIR / "compile.json"))
    args = ap.parse_args(argv)
    prompts = PROMPTS[: args.num_prompts]
    from dspark_serve.models.loader import default_drafter_path

    configs = {"plain": {"method": "none"}, "dspark": {"method": "dspark", "model": default_drafter_path()}}
    result = {"command": "python -m dspark_serve.loadtest.bench_compile", "machine": _machine(), "threads": args.threads,
              "dtype": "bfloat16", "max_tokens": args.max_tokens, "prompts": len(prompts), "configs": {}}
    for name, spec in configs.items():
        from dspark_serve.models.loader import cache_dir

        inductor = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or cache_dir() / "inductor")
        warm = inductor.is_dir() and any(inductor.rglob("*.so"))
        t0 = time.monotonic()
        compiled = _engine(spec, False, args.threads)
        ready_s = time.monotonic() - t0
        step = compiled.engine.runner.decode_step
        t1 = time.monotonic()
        assert step.wait(3600), step.describe()
        compile_s = time.monotonic() - t1
        eager = _engine(spec, True, args.threads)
        entry = {"engine_ready_s": round(ready_s, 1), "compile_wait_s": round(compile_s, 1),
                 "inductor_cache_had_entries": warm, **step.describe(), "points": []}
        print(name, entry, flush=True)
        for c in (1, 8):
            times = {"compiled": [], "eager": []}
            same = True
            tokens = 0
            for r in range(args.rounds):
                order = (("compiled", compiled), ("eager", eager)) if r % 2 == 0 else (("eager", eager), ("compiled", compiled))
                got = {}
                for label, llm in order:
                    ids, secs, tokens = _run(llm, prompts, c, args.max_tokens)
                    got[label] = ids
                    times[label].append(tokens / secs)
                same &= got["compiled"] == got["eager"]
                pairs = list(zip(got["compiled"], got["eager"]))
            ratios = sorted(a / b for a, b in zip(times["compiled"], times["eager"]))
            point = {"concurrency": c, "tokens": tokens, "compiled_tok_s": times["compiled"],
                     "eager_tok_s": times["eager"], "compiled_over_eager": ratios[len(ratios) // 2],
                     "outputs_identical": same,
                     # last round: prompts whose greedy output is the same, and where the others diverge
                     "prompts_identical": sum(a == b for a, b in pairs),
                     "first_divergence": [next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                                          for a, b in pairs if a != b]}
            entry["points"].append(point)
            print(name, point, flush=True)
        result["configs"][name] = entry
        del compiled, eager
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
