"""A step that carries a prompt chunk beside decodes: through the compiled forward or eagerly.

Where no row of a step has a role of its own (float32 on our packed kernel, the paged-attention
kernel attending; engine/model_runner.py `prompts_in_step`), a step with prompt chunks can take the
compiled forward that decode and verification steps take. Eagerly, such a step pays the dispatch of
every op of its decode rows as well. This measures both ways on the server's model and engine
(`--dtype auto`, compiled step ready, speculation off), in one process, interleaved step by step:

- 15 requests decode (200-token prompts); a 16th request with a prompt of P tokens arrives and is
  prefilled in one step beside them (its first token sampled there); the step is timed, routed
  through the graph or the eager path, then a plain decode step of the 15 is timed too;
- `--reps` rounds, the median per P and route.

The routing in the engine also bounds a graph step's long-query attention
(`model_runner.PROMPT_PAIRS_IN_STEP`); this benchmark forces each route to show both sides of it.

Writes docs/benchmarks/mixed-step[-NAME].json and .md.

    python -m dspark_serve.loadtest.bench_mixed_step [--prompts 16,64,128,256,512] [--name avx2]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine, write_results

DECODES, DECODE_PROMPT = 15, 200


def _timed_step(eng) -> float:
    t0 = time.perf_counter()
    eng.step()
    return time.perf_counter() - t0


def run(prompts: list[int], reps: int, threads: int) -> dict:
    from dspark_serve.engine import SamplingParams
    from dspark_serve.engine import model_runner
    from dspark_serve.loadtest.bench_structured import _engine

    torch.set_num_threads(threads)
    llm = _engine({"method": "none"}, threads)
    eng, runner = llm.engine, llm.engine.runner
    if not runner.prompts_in_step:
        raise SystemExit("this model and CPU split prompt rows by role (bf16, or no paged-attention kernel): "
                         "prompt chunks never take the compiled step here")
    rng = random.Random(0)
    vocab = runner.config.vocab_size

    def tokens(n):
        return [rng.randrange(100, vocab - 1) for _ in range(n)]

    endless = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    for i in range(DECODES):
        eng.add_request(f"decode{i}", prompt_token_ids=tokens(DECODE_PROMPT), params=endless)
    while eng.num_waiting or any(s.num_pending_tokens > 1 for s in eng.batcher.running):
        eng.step()
    for _ in range(3):
        eng.step()
    limit = model_runner.PROMPT_PAIRS_IN_STEP
    times: dict[tuple, list[float]] = {}
    try:
        model_runner.PROMPT_PAIRS_IN_STEP = 1 << 62  # the graph route for every P (the engine bounds it)
        for rep in range(reps):
            for p in prompts:
                for graph in (True, False):
                    runner.prompts_in_step = graph
                    rid = f"prompt{p}-{graph}-{rep}"
                    eng.add_request(rid, prompt_token_ids=tokens(p), params=SamplingParams(temperature=0, max_tokens=1))
                    times.setdefault((p, graph), []).append(_timed_step(eng))
                    while eng.num_waiting or any(s.request_id == rid for s in eng.batcher.running):
                        eng.step()
                    times.setdefault(("decode", graph), []).append(_timed_step(eng))
    finally:
        model_runner.PROMPT_PAIRS_IN_STEP = limit
        runner.prompts_in_step = True
    return {"machine": _machine(), "threads": threads, "decodes": DECODES, "decode_prompt": DECODE_PROMPT,
            "reps": reps, "prompt_pairs_in_step": limit, "rows": summarize(times, prompts, limit),
            "decode_ms": 1e3 * statistics.median(times[("decode", True)] + times[("decode", False)]),
            "command": "python -m dspark_serve.loadtest.bench_mixed_step " + " ".join(sys.argv[1:])}


def summarize(times: dict[tuple, list[float]], prompts: list[int], limit: int) -> list[dict]:
    """One row per prompt length: median seconds each way ({(P, graph?): [seconds]}), the speed-up
    of the graph, and the route the engine takes for a fresh prompt of P tokens (the pairs its
    causal attention reads against `limit`; a chunk no longer than a verification block always
    takes the graph)."""
    from dspark_serve.engine.model_runner import long_query_pairs

    rows = []
    for p in prompts:
        g, e = statistics.median(times[(p, True)]), statistics.median(times[(p, False)])
        pairs = long_query_pairs([p], [p])
        rows.append({"prompt_tokens": p, "graph_ms": 1e3 * g, "eager_ms": 1e3 * e, "speedup": e / g,
                     "pairs": pairs, "engine_route": "graph" if pairs <= limit else "eager",
                     "graph_ms_each": [round(1e3 * t, 1) for t in times[(p, True)]],
                     "eager_ms_each": [round(1e3 * t, 1) for t in times[(p, False)]]})
    return rows


def markdown(res: dict) -> str:
    m = res["machine"]
    out = [f"# A prompt chunk beside {res['decodes']} decodes: compiled step or eager",
           "",
           f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, commit {m['commit']}; {res['threads']} torch threads. The server's model and engine "
           "(`--dtype auto`, compiled step ready, speculation off); the step that prefills a P-token "
           f"prompt beside {res['decodes']} decoding requests, median of {res['reps']} interleaved rounds. "
           f"A plain decode step of the {res['decodes']}: {res['decode_ms']:.1f} ms.",
           "",
           f"The engine routes a step through the graph while its long queries attend at most "
           f"{res['prompt_pairs_in_step']:,} (query, key) pairs (`PROMPT_PAIRS_IN_STEP`): the paged-attention "
           "kernel runs each query row on its own, slower than SDPA's tiles for long chunks.",
           "",
           "| prompt tokens | graph (ms) | eager (ms) | speedup | engine's route |",
           "| ---: | ---: | ---: | ---: | --- |"]
    for r in res["rows"]:
        out.append(f"| {r['prompt_tokens']} | {r['graph_ms']:.1f} | {r['eager_ms']:.1f} | {r['speedup']:.2f}x | "
                   f"{r['engine_route']} |")
    out += ["", f"Command: `{res['command']}`", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", default="16,64,128,256,512", help="prompt lengths P, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="", help="suffix of the result files")
    args = ap.parse_args(argv)
    res = run([int(p) for p in args.prompts.split(",")], args.reps, args.threads)
    write_results(OUT_DIR / ("mixed-step" + (f"-{args.name}" if args.name else "")), res, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
