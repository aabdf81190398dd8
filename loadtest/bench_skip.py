"""Offline: plain decoding vs scheduled speculation with a RANDOM drafter (draft skipping on), with
and without the population prior, closed loop at concurrency c. Same prompts, interleaved reps."""
import json, os, sys, tempfile, time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch
torch.set_num_threads(2)
from dspark_serve.engine import EngineConfig, LLMEngine, SamplingParams, apply_chat_template
from dspark_serve.loadtest.bench_spec import _random_drafter
from dspark_serve.training.sharegpt import sharegpt_pairs, sharegpt_path
from dspark_serve.models.loader import load_model

conc = [int(x) for x in sys.argv[1].split(",")]
n_req = int(sys.argv[2])
target = load_model(None, "float32").model
drafter = _random_drafter(target, os.path.join(tempfile.mkdtemp(), "drafter"), 7)
with open(sharegpt_path(), encoding="utf-8", errors="replace") as fp:
    prompts = []
    for _, h, _ in sharegpt_pairs(fp):
        if 20 < len(h) < 600:
            prompts.append(h)
        if len(prompts) >= 400:
            break
engines = {
    "off": LLMEngine(EngineConfig(dtype="float32", num_threads=2, speculative_config={"method": "none"})),
    "scheduled": LLMEngine(EngineConfig(dtype="float32", num_threads=2, speculative_config={"method": "dspark", "model": drafter})),
}
engines["scheduled-no-prior"] = LLMEngine(EngineConfig(dtype="float32", num_threads=2, speculative_config={"method": "dspark", "model": drafter}))
engines["scheduled-no-prior"].speculative.skipper.prior_rounds = None
tok = engines["off"].tokenizer
ids = [apply_chat_template(tok, [{"role": "user", "content": p}]) for p in prompts]

def closed_loop(eng, c, reqs):
    sp = SamplingParams(temperature=0.0, max_tokens=128, ignore_eos=True)
    todo = list(reqs); live = 0; toks = 0; k = 0
    t0 = time.perf_counter()
    while todo or eng.has_unfinished_requests():
        while todo and live < c:
            eng.add_request(f"r{k}-{time.time_ns()}", params=sp, prompt_token_ids=todo.pop(0)); live += 1; k += 1
        for o in eng.step():
            if o.finished:
                live -= 1; toks += len(o.outputs[0].token_ids)
    return toks / (time.perf_counter() - t0)

res = {}
for c in conc:
    reqs = ids[:n_req * c // 2 + c]
    for name, eng in engines.items():
        closed_loop(eng, c, ids[300:300 + max(8, 2 * c)])  # warm-up (the prior learns here too, as in serving)
    for rep in range(2):
        for name, eng in engines.items():
            r = closed_loop(eng, c, reqs)
            res.setdefault(c, {}).setdefault(name, []).append(round(r, 2))
            print(c, name, rep, round(r, 2), flush=True)
out = {c: {n: max(v) for n, v in d.items()} for c, d in res.items()}
for c, d in out.items():
    print(c, {n: round(v / d["off"], 3) for n, v in d.items()})
json.dump({"runs": res, "best": out}, open("docs/benchmarks/skipping-offline.json", "w"), indent=1)
