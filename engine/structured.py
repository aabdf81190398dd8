"""Grammar-constrained decoding: the grammar layer of structured outputs (llguidance).

Three layers, each usable on its own:

- `GrammarSpec`: what a request asks for (OpenAI `response_format`, vLLM's `structured_outputs`
  or legacy `guided_*` fields), validated and made canonical; hashable, the cache key.
- `GrammarCompiler`: one per tokenizer; compiles a spec into a `CompiledGrammar` (thread-safe,
  LRU-cached). Invalid schemas, regexes and grammars raise `GrammarError`.
- `GrammarMatcher`: one per request; the allowed-next-token mask, accepting tokens, rollback
  (speculative verification) and `masks_along` (the masks of a draft block in one call).

Masks are over the tokenizer's vocabulary; a model whose logits are wider (a padded head) gets
the extra ids disallowed. The engine library is imported when the first `GrammarCompiler` is
made, so importing this module costs nothing. See docs/benchmarks/grammar-engines.md for the
engine choice and the cost of each path.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch

__all__ = [
    "GrammarError", "GrammarSpec", "GrammarCompiler", "CompiledGrammar", "GrammarMatcher",
    "apply_mask", "unpack_bitmask", "bitmask_words", "GRAMMAR_KINDS", "MAX_SOURCE_BYTES",
    "DEFAULT_JSON_WHITESPACE", "MIN_ROLLBACK_TOKENS",
]

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "grammar", "choice")
MAX_SOURCE_BYTES = 64 * 1024
# JSON whitespace allowed at each place JSON allows whitespace: bounded, so a model cannot spend
# its whole budget on newlines; wide enough for pretty-printing a few levels deep.
DEFAULT_JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,32}"
# llguidance keeps every accepted token's state: rollback is unbounded. This is the depth the
# rest of the server may rely on (speculative verification rolls back at most a draft block).
MIN_ROLLBACK_TOKENS = 16

_JSON_OBJECT_SCHEMA = '{"type":"object"}'
# vLLM's structured_outputs fields that choose the constraint, and options we accept and ignore
_SO_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
             "json_object": "json_object"}
_SO_IGNORED = {"disable_fallback", "disable_any_whitespace", "disable_additional_properties",
               "whitespace_pattern", "backend", "_backend", "_backend_was_auto"}
_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar", "guided_json_object": "json_object"}
_GUIDED_IGNORED = {"guided_decoding_backend", "guided_whitespace_pattern"}


class GrammarError(ValueError):
    """A structured-output request that cannot be served: malformed, too large, or rejected by
    the grammar engine. `param` names the offending request field (OpenAI's error `param`)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


def _check_size(source: str, param: str | None) -> None:
    n = len(source.encode("utf-8"))
    if n > MAX_SOURCE_BYTES:
        raise GrammarError(f"{param or 'grammar'} is {n} bytes serialised; at most {MAX_SOURCE_BYTES} "
                           "are accepted", param)


@dataclass(frozen=True)
class GrammarSpec:
    """A canonical, hashable description of a constraint.

    `source` by kind: json_schema: the schema as compact JSON, keys in the order given (the order
    of `properties` is the order the output must follow, so it is part of the grammar);
    json_object: ""; regex: the pattern (full match, Rust regex syntax: no look-around or
    back-references); grammar: Lark or GBNF text; choice: the JSON list of the strings.
    `param` (not part of equality) is the request field errors are reported against."""

    kind: str
    source: str
    param: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise GrammarError(f"unknown grammar kind {self.kind!r}; expected one of {', '.join(GRAMMAR_KINDS)}",
                               self.param)
        if not isinstance(self.source, str):
            raise GrammarError("grammar source must be a string", self.param)
        _check_size(self.source, self.param)

    # ---------------------------------------------------------------- constructors of one kind

    @classmethod
    def json_object(cls, param: str | None = None) -> GrammarSpec:
        """Any JSON object."""
        return cls("json_object", "", param)

    @classmethod
    def json_schema(cls, schema: dict | str, param: str | None = None) -> GrammarSpec:
        """A JSON schema (a dict, or its JSON text)."""
        if isinstance(schema, (str, bytes)):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise GrammarError(f"the JSON schema is not valid JSON: {e}", param) from None
        if not isinstance(schema, dict):
            raise GrammarError(f"the JSON schema must be an object, got {type(schema).__name__}", param)
        try:
            source = json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise GrammarError(f"the JSON schema cannot be serialised: {e}", param) from None
        return cls("json_schema", source, param)

    @classmethod
    def regex(cls, pattern: str, param: str | None = None) -> GrammarSpec:
        """The whole output matches `pattern`."""
        if not isinstance(pattern, str) or not pattern:
            raise GrammarError("the regex must be a non-empty string", param)
        return cls("regex", pattern, param)

    @classmethod
    def grammar(cls, text: str, param: str | None = None) -> GrammarSpec:
        """A context-free grammar in Lark syntax (llguidance's dialect) or GBNF (llama.cpp)."""
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar must be a non-empty string", param)
        return cls("grammar", text, param)

    @classmethod
    def choice(cls, choices: Iterable[str], param: str | None = None) -> GrammarSpec:
        """The output is exactly one of `choices` (non-empty strings)."""
        if isinstance(choices, (str, bytes, dict)) or not isinstance(choices, Iterable):
            raise GrammarError("choice must be a list of strings", param)
        items = list(choices)
        if not items:
            raise GrammarError("choice must list at least one string", param)
        for i, c in enumerate(items):
            if not isinstance(c, str) or not c:
                raise GrammarError(f"choice[{i}] must be a non-empty string", param)
        return cls("choice", json.dumps(items, ensure_ascii=False), param)

    # ---------------------------------------------------------------- request shapes

    @classmethod
    def from_response_format(cls, rf: Any) -> GrammarSpec | None:
        """OpenAI `response_format`: {"type": "text"} -> None, {"type": "json_object"}, or
        {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}.
        `strict` is accepted either way: the schema is always enforced."""
        if rf is None:
            return None
        if not isinstance(rf, dict):
            raise GrammarError("response_format must be an object", "response_format")
        kind = rf.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_object(param="response_format")
        if kind == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict):
                raise GrammarError("response_format.json_schema must be an object", "response_format.json_schema")
            name = js.get("name")
            if name is not None and not isinstance(name, str):
                raise GrammarError("response_format.json_schema.name must be a string",
                                   "response_format.json_schema.name")
            strict = js.get("strict")
            if strict is not None and not isinstance(strict, bool):
                raise GrammarError("response_format.json_schema.strict must be a boolean",
                                   "response_format.json_schema.strict")
            param = "response_format.json_schema.schema"
            if js.get("schema") is None:
                raise GrammarError("response_format.json_schema.schema is required", param)
            return cls.json_schema(js["schema"], param=param)
        raise GrammarError(f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                           "response_format.type")

    @classmethod
    def from_structured_outputs(cls, d: Any, _prefix: str = "structured_outputs") -> GrammarSpec | None:
        """vLLM's `structured_outputs`: exactly one of {"json": schema (dict or JSON text),
        "regex": str, "choice": [str, ...], "grammar": str, "json_object": true}. None when none
        is set. vLLM's tuning options (disable_any_whitespace, ...) are accepted and ignored;
        structural_tag and unknown keys are errors."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise GrammarError(f"{_prefix} must be an object", _prefix)
        fields = {}
        for key, value in d.items():
            if key in _SO_KINDS:
                fields[key] = (value, f"{_prefix}.{key}")
            elif key == "structural_tag":
                if value is not None:
                    raise GrammarError("structural_tag is not supported", f"{_prefix}.structural_tag")
            elif key not in _SO_IGNORED:
                raise GrammarError(f"unknown field {key!r} in {_prefix}", f"{_prefix}.{key}")
        return cls._from_fields(fields)

    @classmethod
    def from_guided_fields(cls, **fields: Any) -> GrammarSpec | None:
        """vLLM's legacy request fields guided_json, guided_regex, guided_choice, guided_grammar
        (and guided_json_object); at most one may be set. guided_decoding_backend and
        guided_whitespace_pattern are accepted and ignored."""
        chosen = {}
        for name, value in fields.items():
            if name in _GUIDED:
                chosen[_GUIDED[name]] = (value, name)
            elif name not in _GUIDED_IGNORED:
                raise GrammarError(f"unknown field {name!r}", name)
        return cls._from_fields(chosen)

    @classmethod
    def _from_fields(cls, fields: dict[str, tuple[Any, str]]) -> GrammarSpec | None:
        set_ = {k: v for k, v in fields.items()
                if v[0] is not None and not (k == "json_object" and v[0] is False)}
        if not set_:
            return None
        if len(set_) > 1:
            names = sorted(p for _, p in set_.values())
            raise GrammarError(f"only one structured output constraint may be given, got {', '.join(names)}",
                               names[-1])
        key, (value, param) = next(iter(set_.items()))
        if key == "json":
            return cls.json_schema(value, param)
        if key == "json_object":
            if value is not True:
                raise GrammarError(f"{param} must be a boolean", param)
            return cls.json_object(param)
        if key == "regex":
            return cls.regex(value, param)
        if key == "grammar":
            return cls.grammar(value, param)
        return cls.choice(value, param)


# --------------------------------------------------------------------------------- masks

def bitmask_words(vocab_size: int) -> int:
    """int32 words of a packed mask over `vocab_size` tokens (bit t % 32 of word t // 32)."""
    return (vocab_size + 31) // 32


def unpack_bitmask(packed: torch.Tensor, vocab_size: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """A packed int32 mask -> bool [vocab_size] (ids past the packed words are False)."""
    if out is None:
        out = torch.empty(vocab_size, dtype=torch.bool)
    if packed.device.type != "cpu" or not packed.is_contiguous():
        packed = packed.detach().to("cpu").contiguous()
    p = packed.numpy()
    bits = np.unpackbits(p.view(np.uint8), bitorder="little").view(np.bool_)
    _write_bool(out, bits)
    return out


def _write_bool(out: torch.Tensor, bits: np.ndarray) -> None:
    """out[:n] = bits[:n], out[n:] = False, where n = min(len(out), len(bits))."""
    n = min(out.shape[-1], bits.shape[0])
    if out.device.type == "cpu":
        o = out.numpy()
        o[:n] = bits[:n]
        o[n:] = False
    else:
        out[:n].copy_(torch.from_numpy(np.ascontiguousarray(bits[:n])))
        out[n:] = False


# -inf as numpy writes it into a CPU tensor of each dtype (bfloat16 through its int16 bits)
_NEG_INF = {torch.float32: (None, -np.inf), torch.float16: (None, -np.inf),
            torch.bfloat16: (torch.int16, np.int16(-128))}  # 0xFF80


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place; returns `logits`.

    `mask` is a bool mask (True = allowed) or a packed int32 bitmask over the last dim of
    `logits` (one row, or as many rows as `logits`). Ids past the mask's width are disallowed.
    CPU float32 / bfloat16 / float16 logits take numpy's masked copy (no torch kernel launch,
    no OpenMP pool: the cheapest path measured); others take masked_fill_."""
    width = logits.shape[-1]
    if mask.dtype == torch.int32:
        if mask.dim() == 1:
            mask = unpack_bitmask(mask, width)
        else:
            mask = torch.stack([unpack_bitmask(m, width) for m in mask])
    elif mask.dtype != torch.bool:
        raise TypeError(f"mask must be bool or packed int32, got {mask.dtype}")
    n = min(width, mask.shape[-1])
    fast = _NEG_INF.get(logits.dtype)
    if fast and logits.device.type == "cpu" and mask.device.type == "cpu" and not logits.requires_grad:
        view, neg = fast
        arr = (logits.view(view) if view is not None else logits).numpy()
        np.copyto(arr[..., :n], neg, where=~mask.numpy()[..., :n])
        arr[..., n:] = neg
    else:
        logits[..., :n].masked_fill_(~mask[..., :n].to(logits.device), float("-inf"))
        logits[..., n:] = float("-inf")
    return logits


# --------------------------------------------------------------------------------- compiler

class CompiledGrammar:
    """A spec compiled for one tokenizer; immutable and shareable across requests and threads.
    `matcher()` gives a fresh per-request matcher (a copy of a warmed template: microseconds)."""

    def __init__(self, spec: GrammarSpec, template, executor, vocab_size: int,
                 eos_token_ids: tuple[int, ...], compile_seconds: float):
        self.spec = spec
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.compile_seconds = compile_seconds
        self._template = template
        self._executor = executor
        self._lock = threading.Lock()

    def matcher(self) -> GrammarMatcher:
        with self._lock:  # deep_copy reads the template; keep copies from racing on it
            m = self._template.deep_copy()
        return GrammarMatcher(m, self._executor, self.vocab_size, self.eos_token_ids)


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer, with an LRU cache of `max_cache` grammars.

    `tokenizer`: a fast Hugging Face tokenizer (or an `llguidance.LLTokenizer`).
    `eos_token_ids`: the ids that end generation, as the engine treats them (the grammar allows
    them exactly when the output is complete); default: the tokenizer's EOS.
    `json_whitespace`: a regex for the whitespace JSON may have at each place (None: unbounded).
    `json_lenient`: ignore JSON-schema keywords the engine does not implement instead of failing.

    Thread-safe: `compile` may run on worker threads (llguidance releases the GIL while it
    compiles). Errors are not cached."""

    def __init__(self, tokenizer, eos_token_ids: Iterable[int] | None = None, max_cache: int = 128, *,
                 json_whitespace: str | None = DEFAULT_JSON_WHITESPACE, json_lenient: bool = False):
        import llguidance
        import llguidance.hf

        self._ll = llguidance
        if eos_token_ids is None:
            eos = [tokenizer.eos_token_id]
        else:
            eos = [int(e) for e in eos_token_ids]
        if not eos or any(e is None for e in eos):
            raise ValueError("the tokenizer has no EOS token: pass eos_token_ids")
        if isinstance(tokenizer, llguidance.LLTokenizer):
            self._tok = tokenizer
        else:
            self._tok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=len(tokenizer), eos_token=eos)
        self.vocab_size: int = self._tok.vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(eos)
        self.max_cache = max(0, int(max_cache))
        opts: dict[str, Any] = {"lenient": bool(json_lenient)}
        if json_whitespace is not None:
            opts["whitespace_pattern"] = json_whitespace
        self._json_opts = opts
        self._limits = llguidance.LLParserLimits(verbose_errors=False)
        # masks along a draft in one native call (GrammarMatcher.masks_along); one worker thread:
        # the call is sequential along the draft
        self._executor = llguidance.LLExecutor(num_threads=1)
        self._cache: OrderedDict[GrammarSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.compile_seconds_total = 0.0

    def __len__(self) -> int:
        return len(self._cache)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar of `spec`, from the cache when present. Raises GrammarError."""
        with self._lock:
            cg = self._cache.get(spec)
            if cg is not None:
                self._cache.move_to_end(spec)
                self.hits += 1
                return cg
        cg = self._build(spec)
        with self._lock:
            self.misses += 1
            self.compile_seconds_total += cg.compile_seconds
            raced = self._cache.get(spec)
            if raced is not None:  # another thread compiled it meanwhile: keep one
                return raced
            if self.max_cache:
                self._cache[spec] = cg
                while len(self._cache) > self.max_cache:
                    self._cache.popitem(last=False)
        return cg

    def _grammar_text(self, spec: GrammarSpec) -> str:
        L = self._ll.LLMatcher
        p = spec.param
        if spec.kind in ("json_object", "json_schema"):
            src = _JSON_OBJECT_SCHEMA if spec.kind == "json_object" else spec.source
            try:
                return L.grammar_from_json_schema(src, overrides=self._json_opts)
            except ValueError as e:
                raise GrammarError(f"invalid JSON schema: {e}", p) from None
        if spec.kind == "regex":
            return L.grammar_from_regex(spec.source)
        if spec.kind == "choice":
            # each choice a Lark string literal (JSON escapes); alternatives of one rule
            return L.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in json.loads(spec.source)))
        try:
            return self._ll.grammar_from("grammar", spec.source)  # Lark, or GBNF converted to Lark
        except ValueError as e:
            raise GrammarError(f"invalid grammar: {e}", p) from None

    def _build(self, spec: GrammarSpec) -> CompiledGrammar:
        t0 = time.perf_counter()
        what = {"json_object": "JSON schema", "json_schema": "JSON schema", "regex": "regex",
                "grammar": "grammar", "choice": "choice"}[spec.kind]
        grammar = self._grammar_text(spec)
        is_error, msgs = self._ll.LLMatcher.validate_grammar_with_warnings(grammar, self._tok, limits=self._limits)
        if is_error:
            msg = msgs[0] if msgs else "rejected"
            if "regex parse error" in msg:  # drop the engine's wrapping of the regex in a grammar rule
                msg = msg[msg.index("regex parse error"):].split("\n   1 |")[0]
            raise GrammarError(f"invalid {what}: {_short(msg)}", spec.param)
        template = self._ll.LLMatcher(self._tok, grammar, log_level=0, limits=self._limits)
        if not template.is_error():
            # the first mask builds the lexer's start states: pay it here, once, not per request
            buf = torch.empty(bitmask_words(self.vocab_size), dtype=torch.int32)
            template.unsafe_compute_mask_ptr(buf.data_ptr(), buf.numel() * 4)
        if template.is_error():
            raise GrammarError(f"invalid {what}: {_short(template.get_error())}", spec.param)
        return CompiledGrammar(spec, template, self._executor, self.vocab_size, self.eos_token_ids,
                               time.perf_counter() - t0)


def _short(msg: str, limit: int = 500) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------- matcher

class GrammarDeadEnd(RuntimeError):
    """The request's output constraint cannot be continued with this model's tokenizer: the
    grammar's mask allowed tokens that its matcher then refused, and none is left (seen with
    regex literals holding multi-byte characters whose bytes no token of the vocabulary spells
    the way the matcher expects). A fault of the request's constraint, not of the engine."""

    code = "grammar_dead_end"


class GrammarMatcher:
    """The grammar state of one request. Not thread-safe (one request, one thread at a time).

    The mask allows exactly the tokens `accept` accepts. EOS ids are allowed exactly when the
    output so far is complete; once an EOS is accepted the matcher is terminated and only EOS
    stays allowed (never an empty mask). Rollback reaches back to the first accepted token
    (at least MIN_ROLLBACK_TOKENS)."""

    def __init__(self, ll_matcher, executor, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self._m = ll_matcher
        self._executor = executor
        self.vocab_size = vocab_size          # the tokenizer's: masks cover ids < vocab_size
        self.eos_token_ids = eos_token_ids
        self._words = bitmask_words(vocab_size)
        self._buf = np.zeros(self._words, dtype=np.int32)  # the mask of the current state when _fresh
        self._fresh = False
        self._checked: int | None = None  # a token `allows` confirmed with the matcher in this state
        self._scratch = np.zeros((0, self._words), dtype=np.int32)  # masks_along's rows
        self._eos_row = np.zeros(self._words, dtype=np.int32)       # only EOS allowed
        for e in eos_token_ids:
            if 0 <= e < vocab_size:
                self._eos_row.view(np.uint32)[e >> 5] |= np.uint32(1 << (e & 31))
        self._n = 0                           # tokens accepted (ours)
        # llguidance records no state for an EOS consumed once the grammar has stopped (only EOS
        # allowed): those EOS are a suffix of the accepted tokens, _n - _ll_n of them
        self._ll_n = 0

    # -------------------------------------------------------------- state

    @property
    def num_accepted(self) -> int:
        """Tokens accepted so far (EOS included), net of rollbacks."""
        return self._n

    def is_terminated(self) -> bool:
        """The grammar is finished: only EOS is allowed, or an EOS was accepted."""
        return self._m.is_stopped()

    def is_accepting(self) -> bool:
        """The output so far is complete (an EOS would be accepted now)."""
        return self._m.is_accepting()

    def reset(self) -> None:
        """Back to the start state."""
        self._m.reset()
        self._n = self._ll_n = 0
        self._fresh = False
        self._checked = None

    # -------------------------------------------------------------- masks

    def _compute(self) -> np.ndarray:
        if not self._fresh:
            self._m.unsafe_compute_mask_ptr(self._buf.ctypes.data, self._words * 4)
            self._fresh = True
        return self._buf

    @staticmethod
    def _bit(row: np.ndarray, token_id: int, vocab_size: int) -> bool:
        return 0 <= token_id < vocab_size and bool((int(row[token_id >> 5]) >> (token_id & 31)) & 1)

    def _write_row(self, out: torch.Tensor, packed: np.ndarray) -> None:
        """A packed row into `out`: bool [width] (unpacked) or int32 [>= words] (copied)."""
        if out.dtype == torch.int32:
            if out.shape[-1] < self._words or out.dim() != 1:
                raise ValueError(f"a packed mask needs 1-D int32 with at least {self._words} words")
            if out.device.type == "cpu":
                o = out.numpy()
                o[: self._words] = packed
                o[self._words:] = 0
            else:
                out[: self._words].copy_(torch.from_numpy(packed.copy()))
                out[self._words:] = 0
        elif out.dtype == torch.bool:
            if out.dim() != 1:
                raise ValueError("a bool mask must be 1-D")
            _write_bool(out, np.unpackbits(packed.view(np.uint8), bitorder="little").view(np.bool_))
        else:
            raise ValueError(f"out must be bool or int32, got {out.dtype}")

    def fill_bitmask(self, out: torch.Tensor) -> torch.Tensor:
        """Write the packed next-token mask (int32, bit t % 32 of word t // 32) into `out`, 1-D
        with at least bitmask_words(vocab_size) words; extra words are zeroed. The cheapest
        form: no unpacking, 1/8 of the bytes of a bool mask."""
        self._write_row(out, self._compute())
        return out

    def fill_mask(self, out: torch.Tensor) -> torch.Tensor:
        """Write the allowed-next-token mask into `out`, a bool tensor [width] where width is
        the model's logits width; ids >= the tokenizer's vocabulary are False."""
        if out.dtype != torch.bool:
            raise ValueError("out must be a bool tensor (fill_bitmask writes packed masks)")
        self._write_row(out, self._compute())
        return out

    def allowed_token_ids(self) -> list[int]:
        """The allowed next tokens (for debugging and tests)."""
        bits = np.unpackbits(self._compute().view(np.uint8), bitorder="little")[: self.vocab_size]
        return np.flatnonzero(bits).tolist()

    # -------------------------------------------------------------- transitions

    def allows(self, token_id: int) -> bool:
        """Whether `accept(token_id)` would advance. The mask can allow a token the matcher then
        refuses (llguidance over-approximates a few byte tokens inside a forced multi-byte UTF-8
        character, e.g. a regex literal with a 4-byte character): such a token is checked
        against the matcher (`validate_tokens`, no state change) and struck from the mask."""
        token_id = int(token_id)
        row = self._compute()
        if not self._bit(row, token_id, self.vocab_size):
            return False
        if token_id == self._checked or token_id in self.eos_token_ids:
            return True
        if self._m.validate_tokens([token_id]) == 1:
            self._checked = token_id  # the sampler checked it; accept at commit need not again
            return True
        row.view(np.uint32)[token_id >> 5] &= np.uint32(~(1 << (token_id & 31)) & 0xFFFFFFFF)
        return False

    def accept(self, token_id: int) -> bool:
        """Advance by one token. False (state unchanged) when the grammar does not allow it."""
        token_id = int(token_id)
        if not self.allows(token_id):
            return False
        pushes = not (token_id in self.eos_token_ids and self._m.is_stopped())
        if not self._m.consume_token(token_id):
            raise RuntimeError(f"grammar matcher failed on an allowed token {token_id}: {_short(self._m.get_error())}")
        self._n += 1
        self._ll_n += pushes
        self._fresh = False
        self._checked = None
        return True

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (0 <= n <= num_accepted)."""
        if n < 0 or n > self._n:
            raise ValueError(f"cannot roll back {n} tokens: {self._n} accepted")
        if n == 0:
            return
        ll = max(0, n - (self._n - self._ll_n))  # the trailing stateless EOS go first
        if ll and not self._m.rollback(ll):
            raise RuntimeError(f"grammar rollback failed: {_short(self._m.get_error())}")
        self._n -= n
        self._ll_n -= ll
        self._fresh = False
        self._checked = None

    def masks_along(self, tokens: list[int], out: torch.Tensor) -> int:
        """The masks along a draft, for speculative verification.

        out[j] gets the mask after accepting tokens[:j], for j = 0..k, where k is the number of
        leading tokens the grammar allows (row k is the mask at the first disallowed token, or
        after the last token when all are allowed). `out` has at least len(tokens) + 1 rows of
        bool [width] or packed int32 [>= words]; rows after k are untouched. The state is
        unchanged on return (as if the k tokens were accepted and rolled back). Returns k."""
        tokens = [int(t) for t in tokens]
        n = len(tokens)
        if out.shape[0] < n + 1:
            raise ValueError(f"out needs {n + 1} rows, has {out.shape[0]}")
        # the native call walks the draft: tokens outside the vocabulary end it (never allowed)
        valid = next((i for i, t in enumerate(tokens) if not 0 <= t < self.vocab_size), n)
        if self._scratch.shape[0] < n + 1:
            self._scratch = np.zeros((n + 1, self._words), dtype=np.int32)
        rows = self._scratch[: n + 1]
        rows.fill(0)  # a row left at 0 was not written: the walk ended there
        if valid:
            self._executor.unsafe_compute_mask_ptr_with_draft_token(
                [(self._m, 0, tokens[:valid])], rows.ctypes.data, self._words * 4, n + 1)
        else:
            rows[0] = self._compute()
        k = 0
        while True:
            row = rows[k]
            if not row.any():
                # the native walk stops after an EOS accepted once the grammar had stopped; a
                # stopped matcher allows only EOS (what `accept` one token at a time gives)
                row[:] = self._eos_row
            if k == n or not self._bit(row, tokens[k], self.vocab_size):
                break
            k += 1
        for j in range(k + 1):
            self._write_row(out[j], rows[j])
        self._buf[:] = rows[0]
        self._fresh = True
        return k
