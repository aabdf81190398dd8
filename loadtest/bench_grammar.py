"""Grammar engines for structured outputs, measured on the CPU with one thread (benchmark, not test).

For llguidance, xgrammar and outlines-core, with the served default model's tokenizer
(SmolLM2, 49152 byte-level BPE tokens), over four JSON schemas and `json_object`:

- tokenizer setup: building the engine's view of the vocabulary (once per server);
- compile: schema -> a grammar ready to match (median of fresh compiles, engine caches off);
- mask: the next-token bitmask at every step while a valid instance is fed token by token
  (the instance as `json.dumps` writes it, tokenized as the model would write it);
- accept: consuming one token;
- rollback: undoing the last 1 and 16 accepted tokens (speculative verification), each
  followed by re-accepting them.

The chosen engine's paths in `engine/structured.py` are measured too: the packed bitmask
alone, unpacking it into a bool mask of the model's vocabulary width, and applying a mask
to a logits row.

    python -m dspark_serve.loadtest.bench_grammar [--reps 5] [--engines llguidance,xgrammar,outlines]

Writes docs/benchmarks/grammar-engines.json and .md. An engine that is not installed is
reported as such (install with `pip install --no-deps`; never let pip touch torch).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

# one thread everywhere, before any native library starts its pool
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["OMP_NUM_THREADS"] = "1"

import numpy as np
import torch

from dspark_serve.loadtest.bench_engine import OUT_DIR, _machine

# name -> (schema, a valid instance); schema None = json_object (any JSON object)
CASES: dict[str, tuple[dict | None, object]] = {
    "nested_object": (
        {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "address": {
                    "type": "object",
                    "properties": {
                        "street": {"type": "string"},
                        "city": {"type": "string"},
                        "zip": {"type": "string"},
                    },
                    "required": ["street", "city", "zip"],
                    "additionalProperties": False,
                },
                "active": {"type": "boolean"},
            },
            "required": ["name", "age", "address", "active"],
            "additionalProperties": False,
        },
        {"name": "Ada Lovelace", "age": 36,
         "address": {"street": "12 St James's Square", "city": "London", "zip": "SW1Y 4JH"},
         "active": True},
    ),
    "enum": (
        {
            "type": "object",
            "properties": {
                "status": {"enum": ["active", "inactive", "pending_review"]},
                "priority": {"type": "string", "enum": ["low", "medium", "high", "critical"]},
                "label": {"type": "string"},
            },
            "required": ["status", "priority", "label"],
            "additionalProperties": False,
        },
        {"status": "pending_review", "priority": "critical", "label": "Escalate to on-call"},
    ),
    "array_bounds": (
        {
            "type": "object",
            "properties": {
                "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
                "scores": {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3},
            },
            "required": ["tags", "scores"],
            "additionalProperties": False,
        },
        {"tags": ["python", "inference", "grammar"], "scores": [0.25, 17.5, -3]},
    ),
    "string_pattern": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
                "date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                "count": {"type": "integer"},
            },
            "required": ["id", "date", "count"],
            "additionalProperties": False,
        },
        {"id": "ABC-1234", "date": "2024-06-30", "count": 12},
    ),
    "json_object": (
        None,
        {"city": "Paris", "population": 2102650, "tags": ["capital", "europe"],
         "mayor": {"name": "Anne Hidalgo", "since": 2014}, "coastal": False},
    ),
}

ROLLBACK_DEPTHS = (1, 16)
OPEN_STATE = 1000  # a state where more tokens than this fit is "open" (free text), else "narrow"


def _ns(f, *a):
    t = time.perf_counter_ns()
    r = f(*a)
    return time.perf_counter_ns() - t, r


def _bit(bitmask: torch.Tensor, tok: int) -> bool:
    return bool((int(bitmask[tok // 32]) >> (tok % 32)) & 1)


# ----------------------------------------------------------------------------- engine adapters
# Each adapter: setup(tokenizer, eos) -> seconds; compile(schema) -> compiled; matcher(compiled);
# fill(m, bitmask int32[words]); accept(m, tok) -> bool; rollback(m, n); reset(m).

class _Engine:
    """The matcher calls the engines share (rollback is outlines-core's own)."""

    def rollback(self, m, n):
        m.rollback(n)

    def reset(self, m):
        m.reset()


class LLGuidance(_Engine):
    name = "llguidance"

    def setup(self, tok, eos, vocab):
        import llguidance
        import llguidance.hf

        self.ll = llguidance
        t = time.perf_counter()
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab, eos_token=eos)
        self.version = llguidance.__version__
        return time.perf_counter() - t

    def compile(self, schema):
        src = '{"type": "object"}' if schema is None else json.dumps(schema)
        from dspark_serve.engine.structured import DEFAULT_JSON_WHITESPACE

        # served settings: JSON whitespace bounded as engine/structured.py does
        g = self.ll.LLMatcher.grammar_from_json_schema(
            src, overrides={"whitespace_pattern": DEFAULT_JSON_WHITESPACE})
        err = self.ll.LLMatcher.validate_grammar(g, self.tok)
        if err:
            raise ValueError(err)
        # the lexer and the parser tables are built when the first matcher is made
        m = self.ll.LLMatcher(self.tok, g, log_level=0)
        return g, m

    def matcher(self, compiled):
        return self.ll.LLMatcher(self.tok, compiled[0], log_level=0)

    def fill(self, m, bm):
        m.unsafe_compute_mask_ptr(bm.data_ptr(), bm.numel() * 4)

    def accept(self, m, t):
        return m.consume_token(t)


class XGrammar(_Engine):
    name = "xgrammar"

    def setup(self, tok, eos, vocab):
        import xgrammar

        self.xgr = xgrammar
        t = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        from importlib.metadata import version

        self.version = version("xgrammar")
        return time.perf_counter() - t

    def compile(self, schema):
        src = '{"type": "object"}' if schema is None else json.dumps(schema)
        return self.compiler.compile_json_schema(src, any_whitespace=True)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m, bm):
        m.fill_next_token_bitmask(bm.view(1, -1))

    def accept(self, m, t):
        return m.accept_token(t)


class OutlinesCore(_Engine):
    name = "outlines"

    def setup(self, tok, eos, vocab):
        import outlines_core
        from transformers.convert_slow_tokenizer import bytes_to_unicode

        self.oc = outlines_core
        t = time.perf_counter()
        dec = {c: b for b, c in bytes_to_unicode().items()}
        special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)  # control tokens: never text
        table: dict[bytes, list[int]] = {}
        for s, i in tok.get_vocab().items():
            if i in special or i >= vocab:
                continue
            table.setdefault(bytes(dec[c] for c in s), []).append(i)
        # outlines-core takes one EOS id
        self.vocab = outlines_core.Vocabulary(eos[0], table)
        from importlib.metadata import version

        self.version = version("outlines-core")
        return time.perf_counter() - t

    def compile(self, schema):
        src = '{"type": "object"}' if schema is None else json.dumps(schema)
        regex = self.oc.json_schema.build_regex_from_schema(src, whitespace_pattern=r"[ ]?")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled, max_rollback=32)

    def fill(self, m, bm):
        m.write_mask_into(bm.data_ptr(), bm.numel(), 4)

    def accept(self, m, t):
        try:
            m.advance(t, return_tokens=False)
            return True
        except Exception:
            return False

    def rollback(self, m, n):
        m.rollback_state(n)


ENGINES = {"llguidance": LLGuidance, "xgrammar": XGrammar, "outlines": OutlinesCore}


# ----------------------------------------------------------------------------- measurements

def bench_case(eng, tok, eos: list[int], vocab: int, schema, instance, reps: int) -> dict:
    text = json.dumps(instance)
    tokens = tok.encode(text, add_special_tokens=False)
    words = (vocab + 31) // 32
    bm = torch.zeros(words, dtype=torch.int32)
    # control tokens (<|im_start|>, <|endoftext|>, <repo_name>, ...) must never be allowed as text
    special = sorted((set(tok.all_special_ids) | set(tok.added_tokens_decoder)) - set(eos))

    compile_s, first_mask_s = [], []
    for _ in range(max(3, reps)):
        t = time.perf_counter()
        compiled = eng.compile(schema)
        compile_s.append(time.perf_counter() - t)
        m = eng.matcher(compiled)
        eng.fill(m, bm)
        first_mask_s.append(time.perf_counter() - t)

    cold_ns: list[int] = []   # the first walk of a fresh compile: lazily built engine state
    warm_ns: list[int] = []   # later walks
    narrow_ns: list[int] = []  # ... in states where few tokens fit (structure, keys, numbers)
    open_ns: list[int] = []    # ... where most of the vocabulary fits (inside free strings)
    accept_ns: list[int] = []
    ok = True
    eos_only_at_end = True
    special_leaks = 0
    for rep in range(reps + 1):
        m = eng.matcher(compiled)
        for i, t_id in enumerate(tokens):
            dt, _ = _ns(eng.fill, m, bm)
            (cold_ns if rep == 0 else warm_ns).append(dt)
            if rep:
                allowed = int(np.unpackbits(bm.numpy().view(np.uint8)).sum())
                (open_ns if allowed > OPEN_STATE else narrow_ns).append(dt)
            if not _bit(bm, t_id):
                ok = False
                break
            if rep == 0:
                eos_only_at_end &= not any(_bit(bm, e) for e in eos)
                special_leaks += sum(_bit(bm, s) for s in special)
            da, acc = _ns(eng.accept, m, t_id)
            accept_ns.append(da)
            if not acc:
                ok = False
                break
        if not ok:
            break
        eng.fill(m, bm)
        eos_only_at_end &= any(_bit(bm, e) for e in eos)
    m = eng.matcher(compiled)
    eng.fill(m, bm)
    allowed_first = int(sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in bm.tolist()))

    # speculative verification: roll back d tokens, then recompute the mask and accept them again
    rollback = {}
    if ok:
        for depth in ROLLBACK_DEPTHS:
            d = min(depth, len(tokens))
            rb_ns, redo_ns = [], []
            for _ in range(reps):
                m = eng.matcher(compiled)
                for t_id in tokens:
                    eng.fill(m, bm)
                    eng.accept(m, t_id)
                dt, _ = _ns(eng.rollback, m, d)
                rb_ns.append(dt)
                t0 = time.perf_counter_ns()
                for t_id in tokens[len(tokens) - d:]:
                    eng.fill(m, bm)
                    eng.accept(m, t_id)
                redo_ns.append(time.perf_counter_ns() - t0)
            rollback[str(depth)] = {"depth": d, "rollback_us": statistics.median(rb_ns) / 1e3,
                                    "redo_us": statistics.median(redo_ns) / 1e3}
    q = lambda xs, p: sorted(xs)[int(p * (len(xs) - 1))] / 1e3 if xs else None  # noqa: E731
    return {
        "tokens": len(tokens),
        "walk_ok": ok,
        "eos_only_at_end": eos_only_at_end if ok else None,
        "special_tokens_allowed": special_leaks,
        "allowed_at_first_step": allowed_first,
        "compile_ms": statistics.median(compile_s) * 1e3,
        "first_mask_ms": statistics.median(first_mask_s) * 1e3,
        "mask_us_cold_mean": statistics.fmean(cold_ns) / 1e3 if cold_ns else None,
        "mask_us_mean": statistics.fmean(warm_ns) / 1e3 if warm_ns else None,
        "mask_us_min": min(warm_ns) / 1e3 if warm_ns else None,
        "mask_us_p50": q(warm_ns, 0.5),
        "mask_us_p90": q(warm_ns, 0.9),
        "mask_us_max": max(warm_ns) / 1e3 if warm_ns else None,
        "mask_us_p50_narrow": q(narrow_ns, 0.5),
        "mask_us_p50_open": q(open_ns, 0.5),
        "open_state_share": len(open_ns) / max(1, len(warm_ns)),
        "accept_us_mean": statistics.fmean(accept_ns) / 1e3 if accept_ns else None,
        "rollback": rollback,
    }


def bench_module_paths(tok, eos: list[int], reps: int) -> dict:
    """The chosen engine through engine/structured.py: what one decode step adds per request."""
    from dspark_serve.engine.structured import GrammarCompiler, GrammarSpec, apply_mask

    schema, instance = CASES["nested_object"]
    comp = GrammarCompiler(tok, eos_token_ids=eos)
    t = time.perf_counter()
    cg = comp.compile(GrammarSpec.json_schema(schema))
    compile_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    comp.compile(GrammarSpec.json_schema(schema))
    cached_us = (time.perf_counter() - t) * 1e6
    tokens = tok.encode(json.dumps(instance), add_special_tokens=False)
    res = {"compile_ms": compile_ms, "cache_hit_us": cached_us, "widths": {}}
    new_ns = [_ns(cg.matcher)[0] for _ in range(reps * 10)]
    res["matcher_us"] = statistics.median(new_ns) / 1e3
    for width in (len(tok), len(tok) + 128):  # the model's head may be padded
        bool_mask = torch.zeros(width, dtype=torch.bool)
        packed = torch.zeros((width + 31) // 32, dtype=torch.int32)
        logits = torch.randn(width)
        t_bits, t_bool, t_acc, t_apply_bool, t_apply_bits = [], [], [], [], []
        for _ in range(reps):
            m = cg.matcher()
            for t_id in tokens:   # packed: compute + copy
                t_bits.append(_ns(m.fill_bitmask, packed)[0])
                t_acc.append(_ns(m.accept, t_id)[0])
            m = cg.matcher()
            for t_id in tokens:   # bool: compute + unpack
                t_bool.append(_ns(m.fill_mask, bool_mask)[0])
                row = logits.clone()
                t_apply_bool.append(_ns(apply_mask, row, bool_mask)[0])
                row = logits.clone()
                t_apply_bits.append(_ns(apply_mask, row, packed)[0])
                assert m.accept(t_id)
        k = min(8, len(tokens))
        rows = torch.zeros(k + 1, width, dtype=torch.bool)
        t_along, t_steps = [], []
        for _ in range(reps):
            for start in range(0, len(tokens) - k, k):
                m = cg.matcher()
                for t_id in tokens[:start]:
                    m.accept(t_id)
                t_along.append(_ns(m.masks_along, tokens[start:start + k], rows)[0])
                t0 = time.perf_counter_ns()  # the same k + 1 masks step by step, then the rollback
                for j in range(k + 1):
                    m.fill_mask(rows[j])
                    if j < k:
                        m.accept(tokens[start + j])
                m.rollback(k)
                t_steps.append(time.perf_counter_ns() - t0)
        res["widths"][str(width)] = {
            "fill_bitmask_us": statistics.fmean(t_bits) / 1e3,
            "fill_mask_bool_us": statistics.fmean(t_bool) / 1e3,
            "accept_us": statistics.fmean(t_acc) / 1e3,
            "apply_mask_bool_us": statistics.median(t_apply_bool) / 1e3,
            "apply_mask_bitmask_us": statistics.median(t_apply_bits) / 1e3,
            "masks_along_8_us": statistics.fmean(t_along) / 1e3,
            "step_by_step_8_us": statistics.fmean(t_steps) / 1e3,
        }
    return res


def _fmt(x, nd=1):
    return "-" if x is None else f"{x:.{nd}f}"


def write_md(res: dict, path: Path) -> None:
    lines = [
        "# Grammar engines for structured outputs (CPU, one thread)", "",
        f"Tokenizer: {res['tokenizer']} ({res['vocab']} tokens), EOS {res['eos']}. "
        f"Machine: {res['machine'].get('cpu', '?')}; torch and the engines on one thread. "
        f"`python -m dspark_serve.loadtest.bench_grammar --reps {res['reps']}`. Load average during the run "
        f"{res['load_before']} -> {res['load_after']} (1-minute; on a shared machine the means and tails "
        "include time other processes took).", "",
        "Each case feeds a valid instance (as `json.dumps` writes it, tokenized by the model's tokenizer) "
        "token by token: compute the next-token bitmask, check the token is allowed, accept it. "
        "`compile`: schema to a ready grammar (median of fresh compiles, engine caches off); "
        "`1st mask`: compile + matcher + first mask; `mask cold`: mean per token over the first walk of a "
        "fresh compile (lazily built engine state); `mask` min / median / mean / p90 over later walks (min: the "
        "cost without interference from other processes); `narrow / open`: median mask where at most / more than "
        f"{OPEN_STATE} tokens fit (structure, keys, numbers / inside free strings); "
        "`rb16`: rolling back 16 accepted tokens; `redo16`: then 16 x (mask + accept) again; "
        "`EOS ok`: EOS allowed only when the instance is complete; `special`: control tokens "
        "(`<|im_start|>`, `<|endoftext|>`, `<repo_name>`, ...) allowed somewhere along the walk (should be 0).", "",
        "| engine | case | tokens | walk ok | EOS ok | special | compile ms | 1st mask ms | mask cold us | "
        "mask us (min / p50 / mean / p90) | narrow / open us | accept us | rb1 us | rb16 us | redo16 us |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in res["engines"].items():
        if "error" in e:
            lines.append(f"| {name} | {e['error']} | | | | | | | | | | | | | |")
            continue
        for case, c in e["cases"].items():
            label = f"{name} {e['version']}"
            if "error" in c:
                lines.append(f"| {label} | {case} | error: {c['error'][:100]} | | | | | | | | | | | | |")
                continue
            rb = c["rollback"]
            lines.append(
                f"| {label} | {case} | {c['tokens']} | {'yes' if c['walk_ok'] else 'NO'} | "
                f"{'yes' if c['eos_only_at_end'] else 'NO'} | {c['special_tokens_allowed']} | "
                f"{_fmt(c['compile_ms'], 2)} | {_fmt(c['first_mask_ms'], 2)} | {_fmt(c['mask_us_cold_mean'])} | "
                f"{_fmt(c['mask_us_min'])} / {_fmt(c['mask_us_p50'])} / {_fmt(c['mask_us_mean'])} / "
                f"{_fmt(c['mask_us_p90'])} | {_fmt(c['mask_us_p50_narrow'])} / {_fmt(c['mask_us_p50_open'])} | "
                f"{_fmt(c['accept_us_mean'])} | {_fmt(rb.get('1', {}).get('rollback_us'))} | "
                f"{_fmt(rb.get('16', {}).get('rollback_us'))} | {_fmt(rb.get('16', {}).get('redo_us'))} |")
    lines += ["", "## Summary (mean over the cases)", "",
              "| engine | setup ms | compile ms | 1st mask ms | mask us (min / mean) | narrow / open us | "
              "mask + accept us / token | rollback 16 us | special tokens allowed | install footprint |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, s in res["summary"].items():
        lines.append(
            f"| {name} | {_fmt(s['setup_ms'], 0)} | {_fmt(s['compile_ms'], 2)} | {_fmt(s['first_mask_ms'], 2)} | "
            f"{_fmt(s['mask_us_min'])} / {_fmt(s['mask_us'])} | {_fmt(s['narrow_us'])} / {_fmt(s['open_us'])} | "
            f"{_fmt(s['step_us'])} | {_fmt(s['rollback16_us'])} | "
            f"{s['special_tokens_allowed']} | {s['footprint']} |")
    mp = res.get("module_paths")
    if mp:
        lines += ["", "## engine/structured.py (llguidance), nested_object walk", "",
                  f"Compile (miss) {mp['compile_ms']:.2f} ms, building the spec again + cache hit {mp['cache_hit_us']:.1f} us, "
                  f"`matcher()` {mp['matcher_us']:.1f} us (a copy of the compiled template). Per token (mean; "
                  "apply_mask: median):", "",
                  "| logits width | fill_bitmask us | fill_mask (bool) us | accept us | apply_mask(bool) us | "
                  "apply_mask(packed) us | masks_along 8 tokens us | same, step by step us |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for w, p in mp["widths"].items():
            lines.append(f"| {w} | {_fmt(p['fill_bitmask_us'])} | {_fmt(p['fill_mask_bool_us'])} | "
                         f"{_fmt(p['accept_us'])} | {_fmt(p['apply_mask_bool_us'])} | "
                         f"{_fmt(p['apply_mask_bitmask_us'])} | {_fmt(p['masks_along_8_us'])} | "
                         f"{_fmt(p['step_by_step_8_us'])} |")
    lines += ["", "## Why llguidance", "", res["why"], ""]
    path.write_text("\n".join(lines))


FOOTPRINT = {
    "llguidance": "one abi3 wheel, no Python dependencies",
    "xgrammar": "declares torch, triton, transformers, pydantic, numpy and needs apache-tvm-ffi "
                "(pip would replace the CPU torch unless --no-deps)",
    "outlines": "one wheel, no Python dependencies",
}


def why(res: dict) -> str:
    """The paragraph of the report, from this run's numbers."""
    s = res["summary"]
    ll, xg, oc = s.get("llguidance"), s.get("xgrammar"), s.get("outlines")
    if not (ll and xg and oc):
        return "Not all engines were measured in this run."
    jo = res["engines"]["outlines"]["cases"].get("json_object", {})
    return (
        f"All three walk every case and allow EOS exactly at the end, and all three roll back 16 tokens in "
        f"microseconds. xgrammar computes a mask fastest (mean {xg['mask_us']:.1f} us, min {xg['mask_us_min']:.1f} us, "
        f"against llguidance's {ll['mask_us']:.1f} / {ll['mask_us_min']:.1f} us; {xg['step_us']:.1f} vs "
        f"{ll['step_us']:.1f} us per token with the accept). The gap is in narrow states (structure, keys, numbers: "
        f"median {ll['narrow_us']:.1f} us for llguidance, {xg['narrow_us']:.1f} us for xgrammar); inside free "
        f"strings llguidance is the faster ({ll['open_us']:.1f} vs {xg['open_us']:.1f} us). Either cost is tens of "
        f"microseconds at most per token, next to a CPU decode step of milliseconds. xgrammar fails the "
        f"other criteria: its install declares torch and triton (pip pulls a CUDA torch) plus a separate FFI "
        f"runtime, and with this tokenizer it lets control tokens through as text "
        f"({xg['special_tokens_allowed']} admissions along the walks, e.g. `<|im_start|>` inside a JSON string): "
        f"`TokenizerInfo.from_huggingface` does not recognise them as special (a hand-built vocabulary would). "
        f"outlines-core writes narrow masks fastest ({oc['narrow_us']:.1f} us) but "
        f"free strings cost {oc['open_us']:.1f} us, it builds a regex-DFA index over the "
        f"whole vocabulary per schema ({oc['compile_ms']:.0f} ms mean compile, "
        f"{jo.get('compile_ms', float('nan')):.0f} ms for json_object, on the request's critical path), takes a "
        f"single EOS id and expresses JSON as a regex (bounded nesting). llguidance compiles fastest "
        f"({ll['compile_ms']:.2f} ms, {ll['first_mask_ms']:.2f} ms to the first mask), keeps control tokens out "
        f"of text ({ll['special_tokens_allowed']}), supports JSON schema, regex, Lark/GBNF and choices in one "
        f"engine with unbounded rollback and several EOS ids, and is one wheel without dependencies: it is the "
        f"engine of engine/structured.py."
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--engines", default="llguidance,xgrammar,outlines")
    ap.add_argument("--out", default=str(OUT_DIR))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from dspark_serve.models.loader import default_model_path, gguf_tokenizer

    tok = gguf_tokenizer(Path(default_model_path()))
    vocab = len(tok)
    eos = [tok.convert_tokens_to_ids("<|im_end|>")]  # what the server stops on for this model
    res = {"machine": _machine(), "tokenizer": "SmolLM2-135M-Instruct (GGUF)", "vocab": vocab,
           "eos": eos, "reps": args.reps, "load_before": round(os.getloadavg()[0], 2),
           "engines": {}, "summary": {}}
    for name in args.engines.split(","):
        eng = ENGINES[name]()
        try:
            setup = eng.setup(tok, eos, vocab)
        except Exception as e:  # not installed, or cannot read this tokenizer
            res["engines"][name] = {"error": f"{type(e).__name__}: {e}"}
            print(f"{name}: {e}", file=sys.stderr)
            continue
        er = {"version": eng.version, "setup_ms": setup * 1e3, "cases": {}}
        for case, (schema, instance) in CASES.items():
            try:
                er["cases"][case] = bench_case(eng, tok, eos, vocab, schema, instance, args.reps)
            except Exception as e:
                er["cases"][case] = {"error": f"{type(e).__name__}: {e}"}
            print(name, case, json.dumps(er["cases"][case]), file=sys.stderr)
        res["engines"][name] = er
        ok = [c for c in er["cases"].values() if "error" not in c and c["walk_ok"]]
        mean = lambda xs: statistics.fmean(xs) if xs else None  # noqa: E731
        res["summary"][name] = {
            "cases_ok": len(ok),
            "setup_ms": er["setup_ms"],
            "compile_ms": mean([c["compile_ms"] for c in ok]),
            "first_mask_ms": mean([c["first_mask_ms"] for c in ok]),
            "mask_us": mean([c["mask_us_mean"] for c in ok]),
            "mask_us_min": mean([c["mask_us_min"] for c in ok]),
            "narrow_us": mean([c["mask_us_p50_narrow"] for c in ok if c["mask_us_p50_narrow"] is not None]),
            "open_us": mean([c["mask_us_p50_open"] for c in ok if c["mask_us_p50_open"] is not None]),
            "step_us": mean([c["mask_us_mean"] + c["accept_us_mean"] for c in ok]),
            "rollback16_us": mean([c["rollback"]["16"]["rollback_us"] for c in ok if "16" in c["rollback"]]),
            "special_tokens_allowed": sum(c["special_tokens_allowed"] for c in ok),
            "footprint": FOOTPRINT[name],
        }
    try:
        res["module_paths"] = bench_module_paths(tok, eos, args.reps)
    except ImportError as e:
        print(f"engine/structured.py not measured: {e}", file=sys.stderr)
    res["load_after"] = round(os.getloadavg()[0], 2)
    res["why"] = why(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "grammar-engines.json").write_text(json.dumps(res, indent=2))
    write_md(res, out / "grammar-engines.md")
    print((out / "grammar-engines.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
