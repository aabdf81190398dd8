"""engine/structured.py: request shapes -> GrammarSpec, compiling, masks, accept/rollback, masks_along.

With the served default model's tokenizer (SmolLM2, 49152 byte-level BPE tokens). Fast: no model
forward; every compile is a few milliseconds.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from dspark_serve.engine.structured import (  # noqa: E402
    MAX_SOURCE_BYTES,
    MIN_ROLLBACK_TOKENS,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    apply_mask,
    bitmask_words,
    unpack_bitmask,
)

EOS = 2      # <|im_end|>: what the server stops on for SmolLM2-Instruct
ENDOFTEXT = 0
IM_START = 1
REPO_NAME = 3  # one of the added control tokens

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 16}, "zip": {"type": "string", "maxLength": 8}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "address", "active"],
    "additionalProperties": False,
}
PERSON_OK = {"name": "Ada Lovelace", "age": 36, "address": {"city": "London", "zip": "SW1Y"}, "active": True}

ENUM_PATTERN = {
    "type": "object",
    "properties": {
        "status": {"enum": ["active", "inactive", "pending"]},
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["x", "y", "z"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["status", "id", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Masks are 49k-element tensors: past torch's parallel grain, so on a busy machine every
    fill and compare would wait on the OpenMP pool. The engine calls these on its own thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok(default_tokenizer):
    return default_tokenizer


@pytest.fixture(scope="module")
def compiler(tok):
    return GrammarCompiler(tok, eos_token_ids=[EOS])


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def walk(matcher, tokens) -> int:
    """Accept tokens one by one; the number accepted before the first refusal."""
    for i, t in enumerate(tokens):
        if not matcher.accept(t):
            return i
    return len(tokens)


def mask_of(matcher, width: int) -> torch.Tensor:
    return matcher.fill_mask(torch.empty(width, dtype=torch.bool))


# ------------------------------------------------------------------------------- request shapes

def test_response_format_shapes():
    assert GrammarSpec.from_response_format({"type": "text"}) is None
    assert GrammarSpec.from_response_format(None) is None
    jo = GrammarSpec.from_response_format({"type": "json_object"})
    assert jo.kind == "json_object" and jo == GrammarSpec.json_object()
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    spec = GrammarSpec.from_response_format(rf)
    assert spec.kind == "json_schema" and spec.param == "response_format.json_schema.schema"
    assert json.loads(spec.source) == PERSON
    # canonical: compact, and equal specs hash equal whatever param they carry
    assert " " not in spec.source.replace("Ada Lovelace", "")
    same = GrammarSpec.json_schema(json.dumps(PERSON, indent=2), param="structured_outputs.json")
    assert same == spec and hash(same) == hash(spec)
    # key order of `properties` is the output's order: part of the spec
    reordered = dict(PERSON, properties=dict(reversed(list(PERSON["properties"].items()))))
    assert GrammarSpec.json_schema(reordered) != spec


@pytest.mark.parametrize("rf, param", [
    ("json", "response_format"),
    ({"type": "xml"}, "response_format.type"),
    ({"type": "json_schema"}, "response_format.json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": "{not json"}}, "response_format.json_schema.schema"),
    ({"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}, "response_format.json_schema.name"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
     "response_format.json_schema.strict"),
])
def test_response_format_malformed(rf, param):
    with pytest.raises(GrammarError) as ei:
        GrammarSpec.from_response_format(rf)
    assert ei.value.param == param and isinstance(ei.value, ValueError)


def test_structured_outputs_and_guided_fields():
    so = GrammarSpec.from_structured_outputs
    assert so({"json": PERSON}) == GrammarSpec.json_schema(PERSON)
    assert so({"json": json.dumps(PERSON)}) == GrammarSpec.json_schema(PERSON)
    assert so({"regex": "[a-z]+"}) == GrammarSpec("regex", "[a-z]+")
    assert so({"choice": ["a", "b"]}).source == '["a", "b"]'
    assert so({"grammar": 'start: "x"'}).kind == "grammar"
    assert so({"json_object": True}).kind == "json_object"
    assert so({"json_object": False, "regex": None}) is None
    assert so({"regex": "a", "disable_any_whitespace": True}).kind == "regex"  # vLLM options: ignored
    with pytest.raises(GrammarError) as ei:
        so({"regex": "a", "choice": ["a"]})
    assert "only one" in ei.value.message
    with pytest.raises(GrammarError) as ei:
        so({"regexp": "a"})
    assert ei.value.param == "structured_outputs.regexp"
    with pytest.raises(GrammarError) as ei:
        so({"choice": ["a", 3]})
    assert ei.value.param == "structured_outputs.choice"
    with pytest.raises(GrammarError):
        so({"choice": []})
    with pytest.raises(GrammarError):
        so({"structural_tag": {"type": "x"}})

    g = GrammarSpec.from_guided_fields
    assert g() is None and g(guided_json=None, guided_decoding_backend="xgrammar") is None
    spec = g(guided_json=PERSON)
    assert spec == GrammarSpec.json_schema(PERSON) and spec.param == "guided_json"
    assert g(guided_choice=["yes", "no"]).kind == "choice"
    assert g(guided_regex="[0-9]+").kind == "regex"
    assert g(guided_grammar='root ::= "a"').kind == "grammar"
    with pytest.raises(GrammarError) as ei:
        g(guided_regex="a", guided_choice=["b"])
    assert ei.value.param in ("guided_regex", "guided_choice")
    with pytest.raises(GrammarError):
        g(guided_jsn=PERSON)


def test_source_size_bound(compiler):
    big = {"type": "object", "properties": {f"p{i:05d}": {"type": "string", "description": "x" * 40}
                                            for i in range(MAX_SOURCE_BYTES // 40)}}
    with pytest.raises(GrammarError) as ei:
        GrammarSpec.from_response_format({"type": "json_schema", "json_schema": {"name": "big", "schema": big}})
    assert ei.value.param == "response_format.json_schema.schema" and "bytes" in ei.value.message
    with pytest.raises(GrammarError):
        GrammarSpec.regex("a" * (MAX_SOURCE_BYTES + 1))


# ------------------------------------------------------------------------------- compiling

@pytest.mark.parametrize("spec, param, words", [
    (GrammarSpec.json_schema({"type": "strin"}, "response_format.json_schema.schema"),
     "response_format.json_schema.schema", "strin"),
    (GrammarSpec.json_schema({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "guided_json"),
     "guided_json", "missing"),
    (GrammarSpec.json_schema({"type": "string", "pattern": "(a"}, "structured_outputs.json"),
     "structured_outputs.json", "unclosed"),
    (GrammarSpec.regex("(ab", "structured_outputs.regex"), "structured_outputs.regex", "unclosed group"),
    (GrammarSpec.regex("a(?=b)", "guided_regex"), "guided_regex", "look-around"),
    (GrammarSpec.grammar("start: undefined_rule", "structured_outputs.grammar"), "structured_outputs.grammar",
     "undefined_rule"),
])
def test_invalid_grammar_raises_with_param(compiler, spec, param, words):
    with pytest.raises(GrammarError) as ei:
        compiler.compile(spec)
    assert ei.value.param == param
    assert words in ei.value.message and ei.value.message.startswith("invalid ")


def test_cache_hit_does_not_recompile(tok):
    comp = GrammarCompiler(tok, eos_token_ids=[EOS], max_cache=2)
    a = comp.compile(GrammarSpec.json_schema(PERSON, "response_format.json_schema.schema"))
    assert a.compile_seconds > 0 and comp.misses == 1 and comp.hits == 0
    b = comp.compile(GrammarSpec.json_schema(json.dumps(PERSON), "guided_json"))
    assert b is a and comp.misses == 1 and comp.hits == 1
    # LRU: two more specs evict the least recently used
    comp.compile(GrammarSpec.regex("[0-9]+"))
    comp.compile(GrammarSpec.choice(["a", "b"]))
    assert len(comp) == 2 and comp.misses == 3
    assert comp.compile(GrammarSpec.json_schema(PERSON)) is not a and comp.misses == 4
    # failures are not cached
    for _ in range(2):
        with pytest.raises(GrammarError):
            comp.compile(GrammarSpec.regex("(x"))
    assert comp.misses == 4


def test_compile_from_threads(tok):
    comp = GrammarCompiler(tok, eos_token_ids=[EOS], max_cache=8)
    specs = [GrammarSpec.regex(f"[a-z]{{{i}}}") for i in range(1, 5)] * 3
    results, errors = [], []

    def work(spec):
        try:
            results.append((spec, comp.compile(spec)))
        except Exception as e:  # pragma: no cover - the assertion below reports it
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == len(specs)
    assert len(comp) == 4
    for spec, cg in results:
        assert cg.spec == spec
        assert comp.compile(spec).spec == spec


def test_import_is_lazy():
    code = "import sys, dspark_serve.engine.structured; assert 'llguidance' not in sys.modules, 'imported eagerly'"
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


# ------------------------------------------------------------------------------- walking a grammar

def test_json_schema_walk_accepts_instance_and_rejects_invalid(tok, compiler):
    cg = compiler.compile(GrammarSpec.json_schema(PERSON))
    m = cg.matcher()
    width = tok.vocab_size
    ids = enc(tok, json.dumps(PERSON_OK))
    tight = 0
    for i, t in enumerate(ids):
        mask = mask_of(m, width)
        assert mask[t], f"token {i} {tok.decode([t])!r} not allowed"
        assert not mask[EOS], f"EOS allowed before the end (token {i})"
        assert mask.sum() < width
        tight += int(mask.sum()) < 1000  # outside strings, few tokens fit
        assert m.accept(t)
    assert tight >= len(ids) // 2
    assert m.num_accepted == len(ids)
    assert m.is_terminated() and m.is_accepting()
    assert m.allowed_token_ids() == [EOS]
    assert m.accept(EOS) and m.is_terminated() and m.num_accepted == len(ids) + 1

    # a wrong value type is refused, state unchanged
    m = cg.matcher()
    prefix = enc(tok, '{"name": ')
    assert walk(m, prefix) == len(prefix)
    before = m.allowed_token_ids()
    bad = enc(tok, "36")[0]
    assert bad not in before
    assert not m.accept(bad)
    assert m.num_accepted == len(prefix) and m.allowed_token_ids() == before
    # the property order is the schema's
    m = cg.matcher()
    wrong_order = enc(tok, '{"age": 36, "name": "Ada"}')
    assert walk(m, wrong_order) < len(wrong_order)


def test_mask_allows_exactly_what_accept_accepts(tok, compiler):
    cg = compiler.compile(GrammarSpec.json_schema(PERSON))
    ids = enc(tok, json.dumps(PERSON_OK))
    rng = random.Random(0)
    width = tok.vocab_size + 64  # a padded head
    m = cg.matcher()
    for step in range(0, len(ids), 3):
        while m.num_accepted < step:
            assert m.accept(ids[m.num_accepted])
        mask = mask_of(m, width)
        allowed = torch.nonzero(mask).flatten().tolist()
        disallowed = torch.nonzero(~mask[: tok.vocab_size]).flatten().tolist()
        assert allowed and len(disallowed) >= 17  # at least the control tokens, even inside a string
        assert not mask[tok.vocab_size:].any()
        state = m.allowed_token_ids()
        assert state == allowed
        for t in rng.sample(allowed, min(20, len(allowed))):
            # the engine's parser (not the mask) checks the token on consume: a wrong mask raises
            assert m.accept(t), t
            m.rollback(1)
        for t in rng.sample(disallowed, min(20, len(disallowed))) + [tok.vocab_size, tok.vocab_size + 10, -1]:
            assert not m.accept(t), t
        assert m.allowed_token_ids() == state and m.num_accepted == step


def test_mask_semantics_at_fixed_points(tok, compiler):
    """What the allowed tokens spell, checked on their text (independent of the engine)."""
    cg = compiler.compile(GrammarSpec.json_schema(PERSON))
    m = cg.matcher()
    first = [tok.decode([t]) for t in m.allowed_token_ids()]
    assert first and all(s.lstrip().startswith("{") for s in first)
    walk(m, enc(tok, '{"name": "Ada", "age": '))
    number = [tok.decode([t]) for t in m.allowed_token_ids()]
    assert "3" in number and all(s.strip() == "" or s.strip()[0].isdigit() for s in number)
    # control tokens are never text: not inside a string either
    m = cg.matcher()
    walk(m, enc(tok, '{"name": "Ad'))
    mask = mask_of(m, tok.vocab_size)
    assert mask.sum() > 1000  # most text is allowed in a string...
    for t in (ENDOFTEXT, IM_START, EOS, REPO_NAME):
        assert not mask[t]      # ...but no control token


def test_rollback_restores_mask(tok, compiler):
    cg = compiler.compile(GrammarSpec.json_schema(PERSON))
    ids = enc(tok, json.dumps(PERSON_OK))
    assert len(ids) > MIN_ROLLBACK_TOKENS + 4
    m = cg.matcher()
    masks = []
    for t in ids:
        masks.append(m.allowed_token_ids())
        assert m.accept(t)
    masks.append(m.allowed_token_ids())
    for n in (1, 3, MIN_ROLLBACK_TOKENS, len(ids) - 2):
        m.rollback(n)
        assert m.num_accepted == len(ids) - n
        assert m.allowed_token_ids() == masks[len(ids) - n]
        assert walk(m, ids[len(ids) - n:]) == n
        assert m.allowed_token_ids() == masks[-1]
    # through an accepted EOS (the engine records no state for it) and back
    assert m.accept(EOS) and m.accept(EOS) and m.num_accepted == len(ids) + 2
    m.rollback(3)
    assert m.allowed_token_ids() == masks[-2] and not m.is_terminated()
    with pytest.raises(ValueError):
        m.rollback(m.num_accepted + 1)
    with pytest.raises(ValueError):
        m.rollback(-1)
    m.rollback(m.num_accepted)
    assert m.num_accepted == 0 and m.allowed_token_ids() == masks[0]


def _step_by_step(m, draft, width):
    rows, k = [], 0
    for j in range(len(draft) + 1):
        rows.append(mask_of(m, width))
        if j == len(draft) or not m.accept(draft[j]):
            break
        k += 1
    m.rollback(k)
    return k, rows


@pytest.mark.parametrize("packed", [False, True])
def test_masks_along_equals_step_by_step(tok, compiler, packed):
    width = tok.vocab_size + 64
    cases = [
        (compiler.compile(GrammarSpec.json_schema(PERSON)), enc(tok, json.dumps(PERSON_OK))),
        (compiler.compile(GrammarSpec.regex("[0-9]{2,6}")), enc(tok, "12345")),
    ]
    rng = random.Random(1)
    checked_partial = checked_full = 0
    for cg, ids in cases:
        for cut in range(0, len(ids), 2):
            for tail in ([], [EOS], [EOS, EOS], [EOS, 17], [rng.randrange(tok.vocab_size)], [tok.vocab_size + 5]):
                m = cg.matcher()
                assert walk(m, ids[:cut]) == cut
                draft = ids[cut:cut + 8] + (tail if cut + 8 >= len(ids) else tail[:1])
                before = m.allowed_token_ids()
                fill = -1 if packed else True
                if packed:
                    out = torch.from_numpy(np.full((len(draft) + 1, bitmask_words(width)), fill, dtype=np.int32))
                else:
                    out = torch.from_numpy(np.full((len(draft) + 1, width), fill))
                k = m.masks_along(draft, out)
                assert m.num_accepted == cut and m.allowed_token_ids() == before
                k2, rows = _step_by_step(m, draft, width)
                assert k == k2
                for j in range(k + 1):
                    got = unpack_bitmask(out[j], width) if packed else out[j]
                    assert np.array_equal(got.numpy(), rows[j].numpy()), (cut, tail, j)
                for j in range(k + 1, len(draft) + 1):  # untouched
                    assert (out[j].numpy() == fill).all()
                checked_partial += k < len(draft)
                checked_full += k == len(draft)
    assert checked_partial and checked_full


def test_eos_only_when_complete(tok):
    comp = GrammarCompiler(tok, eos_token_ids=[EOS, ENDOFTEXT])
    # optional properties: the object may end after any of them, never inside one
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string"}}}
    m = comp.compile(GrammarSpec.json_schema(schema)).matcher()
    text = '{"a": 12, "b": "xy"}'
    ids = enc(tok, text)
    for t in ids:
        allowed = set(m.allowed_token_ids())
        assert EOS not in allowed and ENDOFTEXT not in allowed
        assert not m.is_accepting()
        assert not m.accept(EOS) and not m.accept(ENDOFTEXT)
        assert m.accept(t)
    assert {EOS, ENDOFTEXT} <= set(m.allowed_token_ids())
    assert m.accept(ENDOFTEXT) and m.is_terminated()
    # a regex that may go on: EOS allowed together with more digits
    m = comp.compile(GrammarSpec.regex("[0-9]+")).matcher()
    assert EOS not in m.allowed_token_ids()
    assert m.accept(enc(tok, "7")[0])
    allowed = m.allowed_token_ids()
    assert EOS in allowed and len(allowed) > 2 and not m.is_terminated()
    assert m.accept(EOS) and m.is_terminated() and m.allowed_token_ids() == sorted([EOS, ENDOFTEXT])


def test_enum_and_pattern(tok, compiler):
    cg = compiler.compile(GrammarSpec.json_schema(ENUM_PATTERN))

    def full(obj_text):
        m = cg.matcher()
        ids = enc(tok, obj_text)
        return walk(m, ids) == len(ids) and m.is_accepting()

    assert full('{"status": "pending", "id": "ABC-1234", "tags": ["x", "z"]}')
    assert full('{"status": "active", "id": "QQQ-0000", "tags": ["y"]}')
    assert not full('{"status": "paused", "id": "ABC-1234", "tags": ["x"]}')     # not in the enum
    assert not full('{"status": "active", "id": "abc-1234", "tags": ["x"]}')     # pattern: capitals
    assert not full('{"status": "active", "id": "ABC-12345", "tags": ["x"]}')    # pattern: 4 digits
    assert not full('{"status": "active", "id": "ABC-1234", "tags": []}')        # minItems
    assert not full('{"status": "active", "id": "ABC-1234", "tags": ["x", "y", "z", "x"]}')  # maxItems
    # at the enum value, the allowed tokens only begin the listed strings
    m = cg.matcher()
    walk(m, enc(tok, '{"status": "'))
    starts = {tok.decode([t]) for t in m.allowed_token_ids()}
    values = [v + '"' for v in ("active", "inactive", "pending")]
    assert starts and all(any(v.startswith(s) or s.startswith(v) for v in values) for s in starts), starts


def test_choice_regex_and_grammar(tok, compiler):
    def accepts(cg, text):
        m = cg.matcher()
        ids = enc(tok, text)
        return walk(m, ids) == len(ids) and m.is_accepting()

    choice = compiler.compile(GrammarSpec.choice(["yes", "no", "maybe so", 'say "hi"', "é"]))
    for c in ["yes", "no", "maybe so", 'say "hi"', "é"]:
        assert accepts(choice, c), c
    for c in ["ye", "nope", "maybe", "Yes"]:
        assert not accepts(choice, c), c

    rx = compiler.compile(GrammarSpec.regex(r"[0-9]{3}-[a-z]+"))
    assert accepts(rx, "123-abc")
    assert not accepts(rx, "12-abc") and not accepts(rx, "123-") and not accepts(rx, "123-ABC")

    lark = compiler.compile(GrammarSpec.grammar('start: "(" item ("," item)* ")"\nitem: /[a-z]+/'))
    assert accepts(lark, "(ab,cd)") and not accepts(lark, "(ab,)")
    gbnf = compiler.compile(GrammarSpec.grammar('root ::= "on" | "off"'))
    assert accepts(gbnf, "on") and accepts(gbnf, "off") and not accepts(gbnf, "of")


# ------------------------------------------------------------------------------- masks on logits

def test_padded_vocab_and_apply_mask(tok, compiler):
    m = compiler.compile(GrammarSpec.json_schema(PERSON)).matcher()
    width = tok.vocab_size + 100
    mask = torch.ones(width, dtype=torch.bool)
    m.fill_mask(mask)
    assert not mask[tok.vocab_size:].any() and mask.sum() == len(m.allowed_token_ids())
    packed = torch.full((bitmask_words(width),), -1, dtype=torch.int32)
    m.fill_bitmask(packed)
    assert torch.equal(unpack_bitmask(packed, width), mask)
    assert (packed[bitmask_words(tok.vocab_size):] == 0).all()
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for form in (mask, packed):
            logits = torch.randn(width).to(dtype)
            ref = logits.clone()
            apply_mask(logits, form)
            assert torch.equal(torch.isinf(logits), ~mask)
            assert (logits[~mask] == float("-inf")).all()
            assert torch.equal(logits[mask], ref[mask])
    # a mask narrower than the logits (the tokenizer's width) disallows the rest
    logits = torch.zeros(width)
    apply_mask(logits, mask[: tok.vocab_size])
    assert torch.isinf(logits[tok.vocab_size:]).all()
    # rows (a verification block) against their own masks
    rows = torch.randn(2, width)
    two = torch.stack([mask, torch.roll(mask, 1)])
    apply_mask(rows, two)
    assert torch.equal(torch.isinf(rows), ~two) and (rows[torch.isinf(rows)] < 0).all()


@pytest.mark.parametrize("schema", [PERSON, ENUM_PATTERN])
def test_greedy_random_logits_always_valid(tok, compiler, schema):
    cg = compiler.compile(GrammarSpec.json_schema(schema))
    width = tok.vocab_size + 64
    mask = torch.zeros(width, dtype=torch.bool)
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        m = cg.matcher()
        out = []
        for _ in range(600):  # the schemas bound every string, number and array
            logits = torch.randn(width, generator=g)
            apply_mask(logits, m.fill_mask(mask))
            t = int(torch.argmax(logits))
            assert m.accept(t)
            if t == EOS:
                break
            out.append(t)
        else:
            pytest.fail(f"no EOS after 600 tokens: {tok.decode(out)!r}")
        value = json.loads(tok.decode(out))
        jsonschema.validate(value, schema)


# A regex literal with multi-byte characters (a fuzzed request found it): llguidance's mask
# allows byte tokens inside a forced 4-byte character that its matcher then refuses.
DEAD_END_REGEX = "\x86A\U000b61b3\x1dI\xad\U000becab\x9bll\U0001fa4fda"


def test_a_token_the_mask_allows_but_the_matcher_refuses_is_struck_not_raised(tok, compiler):
    m = compiler.compile(GrammarSpec.regex(DEAD_END_REGEX)).matcher()
    struck = None
    for _ in range(40):
        allowed = m.allowed_token_ids()
        if not allowed:
            break
        ok = [t for t in allowed if m.allows(t)]
        refused = sorted(set(allowed) - set(ok))
        if refused:
            struck = refused[0]
            assert not m.accept(struck)  # False, state unchanged (before: RuntimeError)
            assert struck not in m.allowed_token_ids()  # struck from the mask
            break
        assert m.accept(ok[0])
    assert struck is not None, "the regex no longer reaches a token the mask over-allows (llguidance fixed?)"


def test_a_grammar_dead_end_fails_the_request_alone_as_its_own_fault(tok):
    from dspark_serve.engine import LLM, SamplingParams

    llm = LLM(dtype="float32", num_threads=1, max_model_len=256, speculative_config={"method": "none"})
    dead = SamplingParams(max_tokens=16, structured=GrammarSpec.regex(DEAD_END_REGEX))
    fine = SamplingParams(max_tokens=8, structured=GrammarSpec.regex("[a-z]{1,6}"))
    msgs = [{"role": "user", "content": "Say something."}]
    out_dead, out_fine = llm.chat([msgs, msgs], [dead, fine])
    assert out_dead.outputs[0].finish_reason == "error" and out_dead.error_code == "grammar_dead_end"
    assert "cannot be continued" in out_dead.error
    assert out_fine.error is None and out_fine.outputs[0].finish_reason in ("stop", "length")
