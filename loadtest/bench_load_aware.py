"""Load-aware speculation against plain decoding in the engine itself, in ONE run.

The HTTP sweep (`python -m dspark_serve.loadtest sweep`) measures what a user sees, but on a
2-core machine its load generator, the server's event loop and the model share
the cores, and plain decoding itself varies by 30% between rounds. This
benchmark takes the HTTP layer out: two engines in this process (the default
configuration, DSpark with the embedded drafter and the load-aware policy, and
plain decoding), both with the compiled decode step and its cost table ready,
the same chat prompts, `--new-tokens` tokens each (EOS ignored, greedy), the
concurrency grid's requests at once. Rounds are interleaved (the order
alternates), and each point reports the median of the per-round ratios.

Per point it also reports what load-aware drafting did: the positions drafted
per request per step (proposed / decode steps), the drafted rows, their tau,
and the steps the draft budget kept plain.

Writes docs/benchmarks/load-aware-engine.json, .md and .png.

    python -m dspark_serve.loadtest.bench_load_aware [--concurrency-grid 1,2,4,8,16,32] [--rounds 4] [--threads 2]

Both engines are built as the server builds them by default (`--dtype auto`: bf16 where this CPU
computes it faster, else float32 packed by the AVX2 / AVX-512 kernel); the results record which.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, PROMPTS, _machine, write_results
from dspark_serve.loadtest.bench_structured import _engine

STATS = ("steps", "spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens",
         "spec_num_proposed_tokens", "spec_num_decode_steps")


def prompts(dataset: str, num: int, seed: int = 0) -> list[str]:
    """`num` user prompts: the fixed chat prompts ("chat"), ShareGPT's first human turns ("sharegpt",
    prompts of at most 1024 approximate tokens, seeded draw), or the first turns of an eval set
    (a name under ../shared/eval_datasets, or a .jsonl path)."""
    from dspark_serve.loadtest import workloads

    if dataset == "chat":
        return [PROMPTS[i % len(PROMPTS)] for i in range(num)]
    if dataset == "sharegpt":
        from dspark_serve.training.sharegpt import sharegpt_path

        specs = workloads.load_sharegpt(sharegpt_path(), num, seed, workloads.ApproxTokenizer().count,
                                        max_input_len=1024, max_total_len=2048, max_tokens=None)
    else:
        path = Path(dataset) if dataset.endswith(".jsonl") else workloads.eval_dataset_path(dataset)
        specs = workloads.load_jsonl_turns(path, num, seed, max_tokens=0)
    return [s.prompt for s in specs]


def _run(llm, texts: list[str], new_tokens: int) -> dict:
    from dspark_serve.engine import SamplingParams

    msgs = [[{"role": "user", "content": t}] for t in texts]
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    eng = llm.engine
    before = eng.stats.snapshot()
    plain_before = eng.speculative.budget.plain_steps if eng.speculative is not None and eng.speculative.budget else 0
    t0 = time.perf_counter()
    outs = llm.chat(msgs, params)
    seconds = time.perf_counter() - t0
    after = eng.stats.snapshot()
    d = {k: after.get(k, 0) - before.get(k, 0) for k in STATS}
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    plain_after = eng.speculative.budget.plain_steps if eng.speculative is not None and eng.speculative.budget else 0
    return {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, **d,
            "budget_plain_steps": plain_after - plain_before,
            "outputs": [o.outputs[0].token_ids for o in outs]}


def lockstep(engines: dict, prompt_ids: list[list[int]], concurrency: int, new_tokens: int) -> dict[str, dict]:
    """One round in LOCKSTEP: each engine serves all of `prompt_ids` in its own closed loop (`concurrency`
    in flight, a finished request replaced at once), and the engines step alternately, one step
    each. Machine noise (a neighbour, frequency changes) then falls on both alike, where separate
    rounds of the same point differed by up to 2x on a 2-core machine. Each engine's tok/s is its
    output tokens over its own summed step seconds."""
    from dspark_serve.engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    state = {}
    for name, eng in engines.items():
        budget = eng.speculative.budget if eng.speculative is not None else None
        state[name] = {"eng": eng, "queue": list(enumerate(prompt_ids)), "inflight": 0, "seconds": 0.0, "tokens": 0,
                       "outputs": {}, "before": eng.stats.snapshot(),
                       "plain_before": budget.plain_steps if budget else 0, "budget": budget}
    tag = f"ls{time.monotonic_ns()}"
    while any(st["queue"] or st["inflight"] for st in state.values()):
        for name, st in state.items():
            eng = st["eng"]
            while st["queue"] and st["inflight"] < concurrency:
                i, ids = st["queue"].pop(0)
                eng.add_request(f"{tag}-{i}", prompt_token_ids=ids, params=params)
                st["inflight"] += 1
            if not st["inflight"]:
                continue
            t0 = time.perf_counter()
            outs = eng.step()
            st["seconds"] += time.perf_counter() - t0
            for o in outs:
                if o.finished:
                    st["inflight"] -= 1
                    st["tokens"] += len(o.outputs[0].token_ids)
                    st["outputs"][int(o.request_id.rsplit("-", 1)[1])] = o.outputs[0].token_ids
    res = {}
    for name, st in state.items():
        after = st["eng"].stats.snapshot()
        d = {k: after.get(k, 0) - st["before"].get(k, 0) for k in STATS}
        res[name] = {"tok_s": st["tokens"] / st["seconds"], "seconds": st["seconds"], "tokens": st["tokens"], **d,
                     "budget_plain_steps": (st["budget"].plain_steps - st["plain_before"]) if st["budget"] else 0,
                     "outputs": [st["outputs"][i] for i in sorted(st["outputs"])]}
    return res


def _kernel(llm) -> str:
    from dspark_serve.models import kernels, quant

    k = quant.kernel_of(llm.engine.loaded.model)
    return f"{k} ({kernels.isa()})" if "vnni" in k else k


def summarise(concurrency: int, runs: dict[str, list[dict]]) -> dict:
    """One point from the rounds of both engines (`_run` results, round i of each paired)."""
    ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(runs["default"], runs["plain"])]
    d = {k: sum(x[k] for x in runs["default"]) for k in (*STATS, "budget_plain_steps")}
    return {
        "concurrency": concurrency, "plain_tok_s": [x["tok_s"] for x in runs["plain"]],
        "default_tok_s": [x["tok_s"] for x in runs["default"]], "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "positions_per_request_step": d["spec_num_proposed_tokens"] / max(1, d["spec_num_decode_steps"]),
        "drafted_rows": d["spec_num_drafts"],
        "tau": (d["spec_num_accepted_tokens"] + d["spec_num_drafts"]) / max(1, d["spec_num_drafts"]),
        "budget_plain_steps": d["budget_plain_steps"], "steps": d["steps"],
        "same_output": all(a["outputs"] == b["outputs"] for a, b in zip(runs["default"], runs["plain"])),
    }


def markdown(res: dict) -> str:
    lines = [
        "# Load-aware speculation vs plain decoding, in the engine",
        "",
        f"`{res['command']}`",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, torch {res['machine']['torch']}, "
        f"commit {res['machine']['commit']}; {res['threads']} torch threads, "
        f"dtype {res.get('dtype', 'bfloat16')}, packed kernels {res.get('kernel', '?')}. Prompts: {res.get('dataset', 'chat')} "
        + (f"(the first {res['lockstep']} of a seeded draw, the same in every round), {res['new_tokens']} tokens each (EOS "
           f"ignored, greedy), each engine serving them in a closed loop of `concurrency` in flight, the two engines "
           f"stepping alternately (lockstep: tok/s = output tokens over the engine's own step seconds); "
           f"{res['rounds']} rounds." if res.get("lockstep") else
           f"(the first `concurrency` of a seeded draw, the same in every round), {res['new_tokens']} "
           f"tokens each (EOS ignored, greedy), all requests of a point at once; {res['rounds']} interleaved rounds."),
        "",
        "| concurrency | plain tok/s (rounds) | default tok/s (rounds) | default / plain: per round | median | "
        "drafted positions / request / step | drafted rows | tau of drafted rows | steps kept plain by the budget | same output |",
        "| ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for p in res["points"]:
        lines.append(
            f"| {p['concurrency']} | {' / '.join(f'{x:.0f}' for x in p['plain_tok_s'])} | "
            f"{' / '.join(f'{x:.0f}' for x in p['default_tok_s'])} | {', '.join(f'{x:.2f}' for x in p['ratios'])} | "
            f"{p['median_ratio']:.3f} | {p['positions_per_request_step']:.2f} | {p['drafted_rows']} | "
            f"{p['tau']:.2f} | {p['budget_plain_steps']} of {p['steps']} | {p['same_output']} |")
    lines += ["", "Positions per request per step: proposed draft positions over decoding requests' steps, all rounds; "
              "tau: (accepted + drafted rows) / drafted rows; steps kept plain: the draft budget's backoff.", ""]
    return "\n".join(lines)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = [p["concurrency"] for p in res["points"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for p in res["points"]:
        a.scatter([p["concurrency"]] * len(p["ratios"]), p["ratios"], color="0.6", s=12)
    a.plot(c, [p["median_ratio"] for p in res["points"]], "o-", label="median of per-round ratios")
    a.axhline(1.0, color="k", lw=0.8, ls="--")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrency")
    a.set_ylabel("default / plain, output tokens/s")
    a.legend()
    b.plot(c, [p["positions_per_request_step"] for p in res["points"]], "o-")
    b.set_xscale("log", base=2)
    b.set_xlabel("concurrency")
    b.set_ylabel("drafted positions per request per step")
    fig.suptitle("Load-aware speculation in the engine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency-grid", default="1,2,4,8,16,32")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of both engines (default 2)")
    ap.add_argument("--dataset", default="chat",
                    help="chat (fixed prompts), sharegpt, or an eval set (gsm8k, humaneval, ... or a .jsonl path)")
    ap.add_argument("--dtype", default="auto", help="both engines' dtype (default auto, the server's default)")
    ap.add_argument("--out", default=None, help="default: docs/benchmarks/load-aware-engine[-DATASET][-lockstep].json")
    ap.add_argument("--lockstep", type=int, default=0, metavar="N",
                    help="N > 0: each round serves N requests per engine in a closed loop of `concurrency`, the "
                         "two engines stepping alternately (lockstep), instead of one wave of `concurrency` "
                         "requests per engine in turn")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    from dspark_serve.models.loader import default_drafter_path

    grid = [int(x) for x in args.concurrency_grid.split(",")]
    texts = prompts(args.dataset, max(max(grid), args.lockstep))
    from dspark_serve.engine.llm import apply_chat_template
    engines = {"plain": _engine({"method": "none"}, args.threads, dtype=args.dtype),
               "default": _engine({"method": "dspark", "model": default_drafter_path()}, args.threads, dtype=args.dtype)}
    res = {"command": "python -m dspark_serve.loadtest.bench_load_aware " + " ".join(sys.argv[1:] if argv is None else argv), "machine": _machine(),
           "threads": args.threads, "dtype": str(engines["default"].engine.runner.dtype).replace("torch.", ""),
           "kernel": _kernel(engines["default"]), "new_tokens": args.new_tokens, "rounds": args.rounds, "dataset": args.dataset,
           "lockstep": args.lockstep, "points": []}
    tok = engines["plain"].engine.tokenizer
    ids = [apply_chat_template(tok, [{"role": "user", "content": t}]) for t in texts[:args.lockstep]]
    for c in grid:
        runs: dict[str, list[dict]] = {"plain": [], "default": []}
        for r in range(args.rounds):
            order = ("plain", "default") if r % 2 == 0 else ("default", "plain")
            if args.lockstep:
                got = lockstep({name: engines[name].engine for name in order}, ids, c, args.new_tokens)
                for name in order:
                    runs[name].append(got[name])
                continue
            for name in order:
                runs[name].append(_run(engines[name], texts[:c], args.new_tokens))
        point = summarise(c, runs)
        res["points"].append(point)
        print({k: v for k, v in point.items()}, flush=True)
    suffix = ("" if args.dataset == "chat" else "-" + Path(args.dataset).stem) + ("-lockstep" if args.lockstep else "")
    out = Path(args.out) if args.out else OUT_DIR / f"load-aware-engine{suffix}.json"
    write_results(out, res, markdown, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
