"""The compiled decode step (engine/compiled_step.py): four graphs cover every decode and
verification step without recompiling and compute the eager function (to bf16 rounding: the float32
sums inside RMSNorm run in another order), give a token the same bits in each of them, and the
engine serves with them."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from dspark_serve.engine import LLM, SamplingParams
from dspark_serve.engine.compiled_step import SHAPE_CLASSES

BS = 16
# inductor builds C++ kernels (g++ by default); without a compiler the engine serves eagerly (tested below)
needs_compiler = pytest.mark.skipif(shutil.which("g++") is None, reason="inductor needs a C++ compiler")


# bf16, and float32: what --dtype auto serves, packed, on a CPU where bf16 is not faster (models/loader.py)
@pytest.fixture(scope="module", params=["bfloat16", "float32"])
def compiled_llm(request, tiny_llama_dir, tiny_drafter_dir):
    llm = LLM(tiny_llama_dir, dtype=request.param, quantization="int4", num_threads=2, block_size=BS,
              speculative_config={"method": "dspark", "model": tiny_drafter_dir, "verification": "fixed"},
              enforce_eager=False, enable_prefix_caching=False)
    step = llm.engine.runner.decode_step
    assert step is not None and not step.enforce_eager
    assert step.wait(timeout=900), step.describe()
    return llm


def model_dtype(step) -> torch.dtype:
    return next(step.model.parameters()).dtype


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to a few bf16 ulps of the tensor's scale (a wrong graph is off by far more)."""
    return bool(((a.float() - b.float()).abs() <= 0.02 * b.float().abs().max() + 1e-3).all())


@needs_compiler
def test_every_class_compiles_once_and_computes_the_eager_function(compiled_llm):
    step = compiled_llm.engine.runner.decode_step
    assert step.ready == set(SHAPE_CLASSES) and step.failed is None
    assert step.settled  # calls evaluate only the guards that tell the graphs apart (compiled_step._run)
    model, kv = step.model, step.kv
    g = torch.Generator().manual_seed(0)
    seen, exact = set(), 0
    # Sizes unlike the warm-up's: a guard on any of them would recompile, which this refuses.
    with torch.compiler.set_stance("fail_on_recompile"):
        # ... and prompt chunks: one alone, and one among decodes (a mixed step)
        for query_lens in ([1], [6], [8], [1, 1], [1] * 11, [2, 7, 1], [8, 8, 8], [5] * 4, [40], [1, 33, 1]):
            ctx = [q + int(torch.randint(2, 60, (1,), generator=g)) for q in query_lens]
            tables = [torch.randperm(kv.shape[2] // BS, generator=g)[: -(-c // BS)].tolist() for c in ctx]
            inputs = step.inputs(query_lens, ctx, tables)
            ids = torch.randint(0, 400, (sum(query_lens),), generator=g)
            sel = torch.arange(len(ids))
            got = step(ids, inputs, sel)
            with torch.inference_mode():
                logits, aux, new_kv = model.forward_decode(ids, inputs, kv, sel, step.aux_layer_ids)
                # the drafter context entries, computed in the same graph
                want = (logits, step.context(aux, inputs.positions), new_kv)
            seen.add(inputs.shape_class)
            assert got[1].shape == (1, 2, len(ids), *kv.shape[3:])  # the tiny drafter: one layer, the target's heads
            for a, b in zip(got, want):
                assert _close(a, b), query_lens
            exact += torch.equal(got[0], want[0])
            # a mutation check of `_close`: another step's logits are not "close"
            assert not _close(got[0], want[0].roll(1, -1))
        # a context of one token (a dimension of 1, which no graph takes): the eager forward
        inputs = step.inputs([1], [1], [[3]])
        ids, sel = torch.tensor([7]), torch.arange(1)
        with torch.inference_mode():
            assert torch.equal(step(ids, inputs, sel)[0], model.forward_decode(ids, inputs, kv, sel, step.aux_layer_ids)[0])
    assert seen == set(SHAPE_CLASSES)
    if model_dtype(step) == torch.bfloat16:
        # most steps give eager's bits exactly (all 8 here, with torch 2.13); float32 sums in the fused
        # order and is only close (0 of 8 exact here): decode and verification steps both run the graph
        assert exact >= 4


@needs_compiler
def test_the_drafter_pass_compiles_per_class_and_drafts_as_the_eager_pass(compiled_llm):
    """The drafter's pass (context gather, block, base logits, the greedy Markov chain) runs in its
    graphs for any number of rows and any context without recompiling, and computes what the
    eager pass does; few rows take the whole block's graph for fewer positions; calls no graph was
    specialised on (rows past the packed weights' limit), or where the whole block costs more
    (fewer positions for many rows), run the eager pass."""
    from dspark_serve.engine.compiled_step import DRAFT_CLASSES

    runner = compiled_llm.engine.runner
    draft, prop = runner.decode_step.draft, runner.proposer
    assert draft.ready == set(DRAFT_CLASSES) and prop.compiled is draft
    g = torch.Generator().manual_seed(1)
    agree = total = 0

    def args(r, c):
        mask = torch.rand(r, c, generator=g) < 0.8
        mask[:, 0] = True
        return (prop.pool, torch.randint(0, 400, (r,), generator=g), torch.randint(c, c + 50, (r,), generator=g),
                torch.randint(0, prop.pool.shape[2], (r * c,), generator=g), mask)

    with torch.compiler.set_stance("fail_on_recompile"), torch.inference_mode():
        for r, c in ((1, 5), (1, 90), (3, 17), (2, 2), (5, 61)):
            a = args(r, c)
            h, base, _, _ = draft(*a, draft.gamma, False)
            want_h, want_base, _, _ = prop.draft_pass(*a, draft.gamma, False)
            assert _close(h, want_h) and _close(base, want_base), (r, c)
            assert not _close(base, prop.draft_pass(*a[:4], ~a[4], draft.gamma, False)[1])  # the mask matters
            _, _, tokens, conf = draft(*a, draft.gamma, True)
            _, _, want_tokens, want_conf = prop.draft_pass(*a, draft.gamma, True)
            assert tokens.shape == (r, draft.gamma) and _close(conf, want_conf), (r, c)
            agree += int((tokens == want_tokens).sum())
            total += tokens.numel()
        # fewer positions for few rows: the whole block's graph, its leading positions
        a = args(2, 9)
        whole = draft(*a, draft.gamma, True)
        part = draft(*a, draft.gamma - 1, True)
        assert torch.equal(part[2], whole[2][:, :-1]) and torch.equal(part[3], whole[3][:, :-1])
        # the eager pass where no graph is specialised on the call or the whole block costs more
        eager = []
        real = prop.draft_pass
        prop.draft_pass = lambda *a: eager.append(a[-2]) or real(*a)  # the positions it drafts
        try:
            draft(*args(2, 9), draft.gamma, True)
            assert eager == []
            out = draft(*args(draft.FULL_BLOCK_ROWS + 1, 9), draft.gamma - 1, False)
            assert eager == [draft.gamma - 1] and out[1].shape[1] == draft.gamma - 1
            rows = draft.max_rows // draft.gamma + 1
            if rows < 100:  # bf16: the packed weights' row limit (a graph would recompile here)
                draft(*args(rows, 9), draft.gamma, True)
                assert eager[-1] == draft.gamma and len(eager) == 2
        finally:
            del prop.draft_pass
    # near-ties of a random drafter may resolve the other way in bf16; a wrong chain agrees by chance only
    assert agree >= 0.9 * total, (agree, total)


@needs_compiler
def test_engine_output_equals_enforce_eager(compiled_llm, tiny_llama_dir, tiny_drafter_dir):
    """Greedy outputs with the compiled graphs, speculation on, equal --enforce-eager's here (no
    near-tie in these prompts of the tiny model: a regression check, not a promise for every prompt)."""
    eager = LLM(tiny_llama_dir, dtype=str(compiled_llm.engine.runner.dtype).removeprefix("torch."),
                quantization="int4", num_threads=2, block_size=BS,
                speculative_config={"method": "dspark", "model": tiny_drafter_dir, "verification": "fixed"},
                enforce_eager=True, enable_prefix_caching=False)
    assert eager.engine.runner.decode_step.ready == set()
    prompts = [[5, 17, 99, 3, 250], [7] * 30, list(range(40, 52))]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [o.outputs[0].token_ids for o in compiled_llm.generate(prompts, params)]
    want = [o.outputs[0].token_ids for o in eager.generate(prompts, params)]
    assert got == want
    assert compiled_llm.engine.stats.snapshot()["spec_num_drafts"] > 0  # verification blocks ran compiled


@needs_compiler
def test_a_tokens_logits_have_the_same_bits_in_every_graph(compiled_llm):
    """What greedy speculation's exactness rests on in the compiled step: a token computed alone, in
    a batch of decodes, as the first query of a verification block or inside a batch of blocks
    (four graphs) gives the same logits bits. Attention through the paged-attention kernel is
    batch-invariant by construction; the packed linears are per row; what remains is inductor's
    own code for the norms, which must not depend on the graph either."""
    from dspark_serve.models.attention import kernel_serves

    step = compiled_llm.engine.runner.decode_step
    kv = step.kv
    if not kernel_serves(kv.dtype, kv.shape[-1]):
        pytest.skip("the paged-attention kernel does not serve this pool here (the torch path is not batch-invariant)")
    g = torch.Generator().manual_seed(3)
    ctx = [37, 60, 21]  # sequence 0's decode at position 36 is the first query of its block below
    tables = [torch.randperm(kv.shape[2] // BS, generator=g)[: -(-(c + 3) // BS)].tolist() for c in ctx]
    tok = torch.randint(0, 400, (3, 3), generator=g)  # three tokens fed per sequence in a block

    def logits(query_lens, clens, seqs):
        ids = torch.cat([tok[s, :q] for s, q in zip(seqs, query_lens)])
        inputs = step.inputs(query_lens, clens, [tables[s] for s in seqs])
        return step(ids, inputs, torch.arange(len(ids)))[0]

    with torch.compiler.set_stance("fail_on_recompile"):
        alone = logits([1], [ctx[0]], [0])  # single-decode
        batch = logits([1, 1, 1], ctx, [0, 1, 2])  # batch-decode
        block = logits([3], [ctx[0] + 2], [0])  # single-verify: row 0 is the same token at the same position
        blocks = logits([3, 3, 3], [c + 2 for c in ctx], [0, 1, 2])  # batch-verify
    assert torch.equal(alone[0], batch[0])
    assert torch.equal(alone[0], block[0])
    assert torch.equal(block, blocks[:3])
    assert not torch.equal(alone[0], batch[1])  # another sequence's token: these rows do differ


@needs_compiler
def test_prompt_chunks_ride_in_the_graphs_where_no_row_has_a_role(compiled_llm, tiny_llama_dir):
    """Float32 on our packed kernel with the paged-attention kernel: a prompt row is computed like
    any other (no dense split, no mask), so prefill and mixed steps take the compiled forward too,
    without a graph of their own, and answer as the eager engine does."""
    from dspark_serve.models.attention import kernel_serves

    runner = compiled_llm.engine.runner
    step = runner.decode_step
    kernel = kernel_serves(runner.dtype, runner.config.head_dim)
    packs_all = all(getattr(p, "all_rows", False) for p in
                    [getattr(layer, "packed_weight", None) for _, layer in step.model.linears()])
    assert runner.prompts_in_step == (kernel and packs_all)
    assert step.attention_mask == (not kernel)
    if not runner.prompts_in_step:
        pytest.skip(f"{runner.dtype}: prompt rows are split by role here (bf16, or no kernel)")
    fed = []

    class Counting:  # the step, counting the longest query of each call
        def __getattr__(self, name):
            return getattr(step, name)

        def __call__(self, ids, inputs, sel):
            fed.append(int(inputs.query_lens.max()))
            return step(ids, inputs, sel)

    # steps of prompt chunks alone sample one row or none (a chunk that ends before its prompt):
    # the step pads them rather than recompile (a compiler specialises on sizes 0 and 1)
    g = torch.Generator().manual_seed(5)
    with torch.compiler.set_stance("fail_on_recompile"):
        for query_lens, sampled in (([40], [39]), ([40], []), ([30, 20], [49]), ([30, 20], []), ([1, 1], [0])):
            ctx = [q + 7 for q in query_lens]
            tables = [torch.randperm(step.kv.shape[2] // BS, generator=g)[: -(-c // BS)].tolist() for c in ctx]
            ids = torch.randint(0, 400, (sum(query_lens),), generator=g)
            out = step(ids, step.inputs(query_lens, ctx, tables), torch.tensor(sampled, dtype=torch.long))
            assert out[0].shape[0] == len(sampled)
            if sampled:
                every = step(ids, step.inputs(query_lens, ctx, tables), torch.arange(len(ids)))[0]
                assert torch.equal(out[0], every[sampled])
    prompts = [list(range(3, 43)), [9] * 25]  # 40 and 25 tokens: prompt chunks longer than any block
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    runner.decode_step = Counting()
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            got = [o.outputs[0].token_ids for o in compiled_llm.generate(prompts, params)]
    finally:
        runner.decode_step = step
    assert max(fed) >= 25  # the prefill step ran in the graph
    eager = LLM(tiny_llama_dir, dtype="float32", quantization="int4", num_threads=2, block_size=BS,
                speculative_config={"method": "none"}, enforce_eager=True, enable_prefix_caching=False)
    assert got == [o.outputs[0].token_ids for o in eager.generate(prompts, params)]


def test_dense_models_run_the_pure_forward_eagerly(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="bfloat16", quantization="none", num_threads=1, enforce_eager=False,
              speculative_config={"method": "none"})
    step = llm.engine.runner.decode_step
    assert "dense" in step.why_eager and not step.wait(0) and step.ready == set()


@needs_compiler
def test_server_compiles_in_the_background_and_answers_the_same(tiny_llama_dir, tmp_path):
    """Over HTTP: --no-enforce-eager serves at once, reports its graphs in /metrics as they compile,
    and answers greedy requests as --enforce-eager does."""
    import httpx

    from dspark_testing import serving, wait_until

    def metric_value(text, name):
        return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))

    def chat_body(content, **kw):
        return {"model": "m", "messages": [{"role": "user", "content": content}], **kw}

    args = ["--model", tiny_llama_dir, "--dtype", "bfloat16", "--quantization", "int4", "--num-threads", "2",
            "--speculative-config", '{"method": "none"}']
    bodies = [chat_body(f"Count to {n}.", max_tokens=24, temperature=0) for n in (3, 7, 12)]

    def answers(url):
        with httpx.Client(base_url=url, timeout=120) as c:
            model = c.get("/v1/models").json()["data"][0]["id"]
            return [c.post("/v1/chat/completions", json={**b, "model": model}).json()["choices"][0]["message"]["content"]
                    for b in bodies]

    with serving(args + ["--no-enforce-eager"], tmp_path / "compiled.log") as srv:
        def graphs():
            return metric_value(httpx.get(f"{srv.url}/metrics").text, "dspark_compiled_graphs")
        first = answers(srv.url)  # served while compiling (eager until each graph is ready)
        wait_until(lambda: graphs() == len(SHAPE_CLASSES), timeout=900, interval=1, what="4 compiled graphs")
        compiled = answers(srv.url)
    with serving(args + ["--enforce-eager"], tmp_path / "eager.log") as srv:
        assert metric_value(httpx.get(f"{srv.url}/metrics").text, "dspark_compiled_graphs") == 0
        eager = answers(srv.url)
    assert first == compiled == eager


@needs_compiler
def test_idle_engine_reprofiles_its_cost_table_on_the_compiled_step(tiny_llama_dir, tiny_drafter_dir):
    """Algorithm 1 must weigh the step the engine runs: the table profiled at start-up (eager) is
    replaced, in place, by one profiled on the graphs at the first idle moment after they compile."""
    from dspark_serve.engine import LLMEngine
    from dspark_serve.engine.engine import EngineConfig
    from dspark_serve.models.loader import cache_dir

    eng = LLMEngine(EngineConfig(model=tiny_llama_dir, dtype="bfloat16", quantization="int4", num_threads=2,
                                 speculative_config={"method": "dspark", "model": tiny_drafter_dir},
                                 enforce_eager=False))
    table = eng.speculative.cost_table
    assert table is not None and eng.speculative.policy.cost_table is table
    before = table.points
    assert eng.runner.decode_step.wait(900)
    assert eng.warming_up  # compiled, but the table is still the eager one
    spec = eng.speculative
    spec._plain_steps.observe(4, 1.7)  # what the draft budget learnt of eager steps (while compiling)
    spec.budget.record(3, False, batch=4)
    assert spec.budget.positions(4) == 0
    eng.idle()
    assert not eng.warming_up and eng.speculative.cost_table is table and table.points != before
    # ... is forgotten with the eager table: the next step at that load drafts again, priced afresh
    assert spec.budget.positions(4) == spec.gamma and spec._plain_steps.seconds(4, lambda a, b: 1.0) is None
    saved = [p.name for p in (cache_dir() / "cost_tables").glob("*")]
    assert any(n.endswith("-compiled-g7.json") for n in saved) and any("-eager-g" in n for n in saved), saved


def test_a_failed_compile_leaves_the_engine_serving_eagerly(tiny_llama_dir, monkeypatch):
    """No compiler, an inductor bug...: the background thread says why once, and every step runs
    the eager function."""
    from dspark_serve.engine.compiled_step import CompiledStep

    llm = LLM(tiny_llama_dir, dtype="bfloat16", quantization="int4", num_threads=1, enforce_eager=True,
              speculative_config={"method": "none"})
    runner = llm.engine.runner

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    step = CompiledStep(runner.model, runner.kv, (), BS)
    step.start()
    assert not step.wait(60) and "no C++ compiler" in step.failed and step.ready == set() and not step.compiling
    ids, inputs, _, sel = step._dummy(True, False)
    got = step(ids, inputs, sel)
    with torch.inference_mode():
        want = runner.model.forward_decode(ids, inputs, runner.kv, sel, ())
    assert torch.equal(got[0], want[0])


def test_the_inductor_cache_is_one_directory_per_version_of_the_traced_code(tmp_path, monkeypatch):
    """A graph cached by another version of the code can come back with that version's guards
    (a stale size bound recompiled a step mid-serving): the cache directory is keyed by torch's
    version and the traced source; a directory the user chose is kept."""
    from dspark_serve.engine import compiled_step

    fp = compiled_step.code_fingerprint()
    assert re.fullmatch(r"[0-9a-f]{16}", fp) and compiled_step.code_fingerprint() == fp
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    assert compiled_step.code_fingerprint() != fp
    monkeypatch.undo()
    monkeypatch.setenv("DSPARK_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    compiled_step._use_dspark_inductor_cache()
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor" / fp)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    compiled_step._use_dspark_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
