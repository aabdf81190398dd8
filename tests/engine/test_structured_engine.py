"""Structured outputs in the engine with the real default model: grammar-masked greedy decoding is
the same with DSpark (drafter, context lookup) and without, copies that leave the grammar are cut,
and a grammar that cannot finish in the budget ends at max_tokens."""

from __future__ import annotations

import json

import jsonschema
import pytest

from dspark_serve.engine import LLM, SamplingParams
from dspark_serve.engine.structured import GrammarSpec

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
    },
    "required": ["title", "tags", "year"], "additionalProperties": False,
}
# a prompt that repeats itself: context lookup finds matches and offers copies, some of which
# leave the grammar (the engine cuts them)
PROMPTS = [
    "Give a JSON record for the book 'Dune' with tags and year.",
    "Repeat after me: {\"title\": \"x\", \"tags\": [\"a\"], \"year\": 1999} {\"title\": \"x\", \"tags\": [\"a\"], "
    "\"year\": 1999}. Now write one record.",
]


@pytest.fixture(scope="module")
def engines():
    from dspark_serve.models.loader import default_drafter_path

    # the serving dtype (`auto`; the suite pins float32, what --dtype auto serves on CPUs without fast
    # bf16): a bf16 engine here took 3.5 minutes of the suite on such a CPU
    plain = LLM(dtype="auto", num_threads=1, speculative_config={"method": "none"})
    # the server's default: DSpark with context lookup
    spec = LLM(dtype="auto", num_threads=1, speculative_config={"method": "dspark", "model": default_drafter_path()})
    return plain, spec


def _chat(llm, prompts, params):
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    return [o.outputs[0] for o in outs]


def test_greedy_json_schema_is_identical_with_and_without_dspark(engines):
    plain, spec = engines
    params = SamplingParams(temperature=0, max_tokens=80, structured=GrammarSpec.json_schema(SCHEMA))
    a = _chat(plain, PROMPTS, params)
    b = _chat(spec, PROMPTS, params)
    for x, y in zip(a, b):
        assert x.token_ids == y.token_ids
        assert x.finish_reason == "stop"
        jsonschema.validate(json.loads(x.text), SCHEMA)
    st = spec.engine.stats
    assert st.spec_num_drafts > 0 and st.structured_requests == len(PROMPTS)
    assert st.grammar_mask_rows >= sum(len(x.token_ids) for x in b)


def test_context_copies_that_leave_the_grammar_are_cut(engines):
    """Context lookup made to prefer every copy: copies of the prompt's text that break the
    schema are cut at their first disallowed token, and the output is still plain greedy's."""
    from dspark_serve.engine.lookup import LookupStats

    plain, spec = engines
    sp = spec.engine.speculative
    saved = sp.lookup
    sp.lookup = LookupStats(8, spec.engine.gamma, prior=0.999, prior_weight=1e9)
    try:
        params = SamplingParams(temperature=0, max_tokens=80, structured=GrammarSpec.json_schema(SCHEMA))
        cuts = spec.engine.stats.grammar_draft_cuts
        b = _chat(spec, PROMPTS[1:], params)
        assert spec.engine.stats.grammar_draft_cuts > cuts
        assert b[0].token_ids == _chat(plain, PROMPTS[1:], params)[0].token_ids
    finally:
        sp.lookup = saved


def test_unconstrained_and_constrained_requests_share_a_batch(engines):
    """A constrained request beside free ones: the free ones get exactly their solo answers."""
    plain, spec = engines
    free = SamplingParams(temperature=0, max_tokens=24)
    solo = _chat(spec, PROMPTS[:1], free)[0].token_ids
    outs = spec.chat([[{"role": "user", "content": PROMPTS[0]}]] * 2,
                     [free, SamplingParams(temperature=0, max_tokens=24, structured=GrammarSpec.choice(["yes", "no"]))])
    assert outs[0].outputs[0].token_ids == solo
    assert outs[1].outputs[0].text in ("yes", "no")


def test_a_grammar_that_cannot_finish_ends_at_max_tokens(engines):
    _, spec = engines
    schema = {"type": "object", "properties": {"s": {"type": "string", "minLength": 1000}}, "required": ["s"]}
    out = _chat(spec, PROMPTS[:1], SamplingParams(temperature=0, max_tokens=10,
                                                  structured=GrammarSpec.json_schema(schema)))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 10
    assert out.text.startswith('{"s":') or out.text.startswith("{")


def test_a_bad_schema_is_a_request_error_naming_the_field(engines):
    from dspark_serve.engine.engine import RequestError

    _, spec = engines
    with pytest.raises(RequestError) as e:
        spec.engine.compile_grammar(GrammarSpec.json_schema({"type": "nonsense"}, param="response_format"))
    assert e.value.param == "response_format"


def test_masks_computed_during_the_forward_equal_masks_computed_inline(engines):
    """The masks depend only on tokens fixed before the forward, so computing them on the worker
    thread while it runs changes nothing: greedy and seeded sampled outputs are the same as with
    the masks computed inline; inline, every mask second blocks the step."""
    _, spec = engines
    eng = spec.engine
    params = [SamplingParams(temperature=0, max_tokens=40, structured=GrammarSpec.json_schema(SCHEMA)),
              SamplingParams(temperature=0.9, seed=7, max_tokens=40, structured=GrammarSpec.json_schema(SCHEMA))]
    runs = {}
    try:
        for overlap in (True, False):
            eng.grammar_overlap = overlap
            before = (eng.stats.grammar_mask_seconds, eng.stats.grammar_mask_blocking_seconds)
            runs[overlap] = [o.token_ids for o in _chat(spec, PROMPTS[:1] * 2, params)]
            spent = eng.stats.grammar_mask_seconds - before[0]
            blocked = eng.stats.grammar_mask_blocking_seconds - before[1]
            assert 0 < blocked <= spent + 1e-9
            if not overlap:
                assert blocked == pytest.approx(spent)
    finally:
        eng.grammar_overlap = True
    assert runs[True] == runs[False]
