"""Structured outputs: speed and DSpark acceptance with and without a JSON schema (issue 32).

    python -m dspark_serve.loadtest.bench_structured [--threads 2] [--rounds 2] [--out docs/benchmarks/structured.json]

The default model as `--dtype auto` serves it (bfloat16 on the CPU of the committed results;
the results record it), compiled decode step waited for; plain decoding and DSpark (the
default drafter, context lookup on), each with and without a JSON schema, on 8 chat prompts that
ask for a JSON record, greedy, up to 160 tokens. Concurrency 1 (one request at a time: tokens/s
per user) and 8 (all together: output tokens/s). Reports tokens/s, tau (tokens per verification
round: 1 + accepted drafts / rounds), the share of drafted tokens accepted, and the grammar's
mask time per token (all of it, and the part the engine step waited on: the masks are computed
during the forward). The engines run interleaved per round in one process. Then the drafter's
own acceptance with a fixed 7-token verification: free text, the schema with masked drafting,
the schema with unmasked drafting (what masking is worth).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine, write_results

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "category": {"enum": ["book", "film", "city", "food", "person"]},
        "year": {"type": "integer", "minimum": 0, "maximum": 2100},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 1, "maxItems": 4},
        "summary": {"type": "string", "maxLength": 200},
    },
    "required": ["name", "category", "year", "tags", "summary"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe the novel 'Pride and Prejudice' as a JSON record with name, category, year, tags and summary.",
    "Give a JSON record (name, category, year, tags, summary) for the city of Kyoto.",
    "Write a JSON object describing the film 'Casablanca': name, category, year, tags, summary.",
    "Return JSON with fields name, category, year, tags and summary for the food 'paella'.",
    "As JSON (name, category, year, tags, summary), describe Marie Curie.",
    "Produce a JSON record for the book 'Moby-Dick' with name, category, year, tags and a summary.",
    "JSON please: name, category, year, tags, summary of the film 'Metropolis'.",
    "Give me a JSON object for Lisbon with name, category, year founded, tags and summary.",
]


def _engine(spec: dict, threads: int, eager: bool = False, dtype: str = "auto"):
    """An engine as the server builds it by default (`--dtype auto`: bf16 where the CPU computes
    it faster, else float32 packed), its compiled step and cost table ready."""
    from dspark_serve.engine import LLM

    llm = LLM(dtype=dtype, num_threads=threads, enforce_eager=eager, speculative_config=spec)
    step = llm.engine.runner.decode_step
    if step is not None and not eager:
        assert step.wait(3600), step.describe()
    while llm.engine.warming_up:  # the cost table, re-profiled on the compiled step
        llm.engine.idle()
        time.sleep(0.2)
    return llm


def _run(llm, constrained: bool, concurrency: int, max_tokens: int) -> dict:
    from dspark_serve.engine import SamplingParams
    from dspark_serve.engine.structured import GrammarSpec

    params = SamplingParams(temperature=0, max_tokens=max_tokens,
                            structured=GrammarSpec.json_schema(SCHEMA) if constrained else None)
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS]
    st = llm.engine.stats
    before = st.snapshot()
    t0 = time.perf_counter()
    outs = []
    for i in range(0, len(msgs), concurrency):
        outs += llm.chat(msgs[i:i + concurrency], params)
    seconds = time.perf_counter() - t0
    after = st.snapshot()
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    d = {k: after[k] - before[k] for k in ("spec_num_drafts", "spec_num_draft_tokens", "spec_num_accepted_tokens",
                                           "grammar_mask_rows", "grammar_mask_seconds",
                                           "grammar_mask_blocking_seconds")}
    valid = None
    if constrained:
        valid = sum(1 for o in outs if _valid(o.outputs[0].text))
    return {"tok_s": tokens / seconds, "tokens": tokens, "seconds": seconds,
            "tau": 1 + d["spec_num_accepted_tokens"] / d["spec_num_drafts"] if d["spec_num_drafts"] else None,
            "accepted_share": (d["spec_num_accepted_tokens"] / d["spec_num_draft_tokens"]
                               if d["spec_num_draft_tokens"] else None),
            "mask_us_per_token": (d["grammar_mask_seconds"] / d["grammar_mask_rows"] * 1e6
                                  if d["grammar_mask_rows"] else None),
            "mask_blocking_us_per_token": (d["grammar_mask_blocking_seconds"] / d["grammar_mask_rows"] * 1e6
                                           if d["grammar_mask_rows"] else None),
            "valid_json": valid, "outputs": [o.outputs[0].token_ids for o in outs]}


def acceptance(llm, max_tokens: int) -> list[dict]:
    """The drafter's own acceptance on these prompts: every round verifies all 7 drafts (no plan,
    no context lookup, no skipping), so tau measures the drafts alone. Free text; under the
    schema with the drafter drafting under the grammar (the engine's way); and under the schema
    with the drafter drafting freely (verification cuts a draft at its first disallowed token)."""
    rows = []
    for label, constrained, mask in (("free text", False, True), ("JSON schema, masked drafting", True, True),
                                     ("JSON schema, unmasked drafting", True, False)):
        llm.engine.proposer.mask_drafts = mask
        r = _run(llm, constrained, 8, max_tokens)
        rows.append({"drafting": label, "tau": r["tau"], "accepted_share": r["accepted_share"],
                     "tokens": r["tokens"], "outputs": r["outputs"]})
    llm.engine.proposer.mask_drafts = True
    rows[2]["same_output_as_masked"] = rows[2].pop("outputs") == rows[1]["outputs"]
    for r in rows:
        r.pop("outputs", None)
    return rows


def _valid(text: str) -> bool:
    try:
        import jsonschema

        jsonschema.validate(json.loads(text), SCHEMA)
        return True
    except Exception:
        return False


def markdown(res: dict) -> str:
    m = res["machine"]
    machine = f"{m.get('cpu')}, {m.get('cores')} cores, torch {m.get('torch')}, commit {m.get('commit')}"
    lines = [f"`{res['command']}`; {machine}, {res['threads']} torch threads, {res.get('dtype', 'bfloat16')}, the compiled step; "
             f"{len(PROMPTS)} prompts asking for a JSON record, greedy, up to {res['max_tokens']} tokens; "
             f"{res['rounds']} interleaved rounds (medians).", "",
             "| decoding | output | concurrency | tok/s (each round) | tau | drafted tokens accepted | "
             "mask us / token (blocking) | valid JSON | x plain, same output |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in res["points"]:
        ratio = p.get("over_plain")
        tau = "-" if p["tau"] is None else f"{p['tau']:.2f}"
        share = "-" if p["accepted_share"] is None else f"{p['accepted_share']:.0%}"
        mask = "-" if p["mask_us_per_token"] is None else \
            f"{round(p['mask_us_per_token'])} ({round(p['mask_blocking_us_per_token'])})"
        valid = "-" if p["valid_json"] is None else f"{p['valid_json']} of {len(PROMPTS)}"
        versus = "-" if ratio is None else f"{ratio:.2f}x, {'yes' if p['same_output_as_plain'] else 'no'}"
        rounds = " / ".join(f"{t:.1f}" for t in p["tok_s"])
        output = "JSON schema" if p["constrained"] else "free text"
        lines.append(f"| {p['decoding']} | {output} | {p['concurrency']} | {rounds} | {tau} | {share} | {mask} | "
                     f"{valid} | {versus} |")
    if res.get("acceptance"):
        lines += ["", "The drafter's own acceptance (every round verifies 7 drafts; no plan, no context lookup, "
                  "no draft skipping; concurrency 8):", "",
                  "| drafting | tau | drafted tokens accepted | output tokens |", "| --- | ---: | ---: | ---: |"]
        for a in res["acceptance"]:
            same = "" if "same_output_as_masked" not in a else \
                f" (output {'the same as' if a['same_output_as_masked'] else 'DIFFERS from'} masked drafting's)"
            lines.append(f"| {a['drafting']}{same} | {a['tau']:.2f} | {a['accepted_share']:.0%} | {a['tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--out", default=str(OUT_DIR / "structured.json"))
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    from dspark_serve.models.loader import default_drafter_path

    engines = {"plain": _engine({"method": "none"}, args.threads),
               "dspark": _engine({"method": "dspark", "model": default_drafter_path()}, args.threads)}
    res = {"command": "python -m dspark_serve.loadtest.bench_structured", "machine": _machine(), "threads": args.threads,
           "dtype": str(engines["plain"].engine.runner.dtype).replace("torch.", ""), "max_tokens": args.max_tokens, "rounds": args.rounds, "schema": SCHEMA, "points": []}
    for constrained in (False, True):
        for c in (1, 8):
            runs: dict[str, list[dict]] = {"plain": [], "dspark": []}
            for r in range(args.rounds):
                for name in (("plain", "dspark") if r % 2 == 0 else ("dspark", "plain")):
                    runs[name].append(_run(engines[name], constrained, c, args.max_tokens))
            for name, rs in runs.items():
                mid = sorted(rs, key=lambda x: x["tok_s"])[len(rs) // 2]
                point = {"decoding": name, "constrained": constrained, "concurrency": c,
                         "tok_s": [x["tok_s"] for x in rs],
                         **{k: mid[k] for k in ("tau", "accepted_share", "mask_us_per_token",
                                                "mask_blocking_us_per_token", "valid_json")}}
                if name == "dspark":
                    ratios = sorted(a["tok_s"] / b["tok_s"] for a, b in zip(rs, runs["plain"]))
                    point["over_plain"] = ratios[len(ratios) // 2]
                    point["same_output_as_plain"] = rs[-1]["outputs"] == runs["plain"][-1]["outputs"]
                res["points"].append(point)
                print(point, flush=True)
    del engines
    fixed = _engine({"method": "dspark", "model": default_drafter_path(), "verification": "fixed",
                     "draft_skipping": False, "prompt_lookup_max": 0}, args.threads, eager=True)
    res["acceptance"] = acceptance(fixed, args.max_tokens)
    print(res["acceptance"], flush=True)
    write_results(Path(args.out), res, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
