"""Drafter training: the block mask, label alignment, the loss, a learning test, gen-data round trip."""

from __future__ import annotations

import json

import pytest
import torch

from dspark_serve.engine.llm import apply_chat_template
from dspark_serve.models.dspark import load_drafter, shared_context_attention
from dspark_serve.models.loader import load_model
from dspark_serve.training.data import (
    MANIFEST, GenDataConfig, gen_data, read_manifest, teacher_pass, write_json_atomic, write_shard,
)
from dspark_serve.training.trainer import (
    CachedDataset, TrainableDrafter, TrainConfig, build_drafter, context_mask, drafter_loss, evaluate,
    expected_tau_from_tv, make_blocks, position_weights, sparse_tv, train_drafter,
)


def test_context_mask_never_shows_a_block_its_own_future():
    m = context_mask(torch.tensor([3, 5]), 8)
    assert m[0].tolist() == [True] * 3 + [False] * 5
    assert m[1].tolist() == [True] * 5 + [False] * 3


def test_a_context_window_shows_a_block_only_its_last_positions():
    m = context_mask(torch.tensor([3, 7, 1]), 8, window=2)
    assert m[0].tolist() == [False, True, True] + [False] * 5
    assert m[1].tolist() == [False] * 5 + [True, True, False]
    assert m[2].tolist() == [True] + [False] * 7  # shorter than the window: all of it
    assert torch.equal(context_mask(torch.tensor([3, 7]), 8, window=None), context_mask(torch.tensor([3, 7]), 8))


def test_shared_context_attention_sees_past_context_and_its_whole_block_only():
    """The drafter's attention for training's blocks (one context shared by a sequence's blocks)."""
    torch.manual_seed(0)
    a, g, h, hk, d, c = 2, 4, 4, 2, 8, 10
    q = torch.randn(a, g, h, d)
    ck, cv = torch.randn(c, hk, d), torch.randn(c, hk, d)
    bk, bv = torch.randn(a, g, hk, d), torch.randn(a, g, hk, d)
    anchors = torch.tensor([4, 7])
    cmask = context_mask(anchors, c)
    out = shared_context_attention(q, ck, cv, bk, bv, cmask, d**-0.5)
    # changing context at or after block 0's anchor leaves block 0 unchanged, but not block 1
    ck2, cv2 = ck.clone(), cv.clone()
    ck2[5], cv2[5] = torch.randn(hk, d), torch.randn(hk, d)
    out2 = shared_context_attention(q, ck2, cv2, bk, bv, cmask, d**-0.5)
    assert torch.allclose(out2[0], out[0])
    assert not torch.allclose(out2[1], out[1])
    # bidirectional within the block: the first position sees the last one's key/value
    bv2 = bv.clone()
    bv2[0, g - 1] += 1.0
    out3 = shared_context_attention(q, ck, cv, bk, bv2, cmask, d**-0.5)
    assert not torch.allclose(out3[0, 0], out[0, 0])
    assert torch.allclose(out3[1], out[1])  # ... and never another block's
    # the same numbers as a dense masked softmax over [context | own block]
    rep = h // hk
    for i in range(a):
        keys = torch.cat([ck, bk[i]]).repeat_interleave(rep, 1)
        vals = torch.cat([cv, bv[i]]).repeat_interleave(rep, 1)
        mask = torch.cat([cmask[i], torch.ones(g, dtype=torch.bool)])
        s = torch.einsum("ghd,khd->hgk", q[i], keys) * d**-0.5
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
        ref = torch.einsum("hgk,khd->ghd", p, vals).reshape(g, h * d)
        assert torch.allclose(out[i], ref, atol=1e-5)


def test_label_alignment():
    anchors = torch.tensor([5, 8])
    pos, rows, valid = make_blocks(seq_len=11, prompt_len=5, gamma=4, anchors=anchors)
    assert pos[0].tolist() == [6, 7, 8, 9]  # block position k predicts anchor + k
    assert rows[0].tolist() == [1, 2, 3, 4]  # target output at q-1 = response row q - prompt_len
    assert valid[1].tolist() == [True, True, False, False]  # 9, 10 inside; 11, 12 past the end


def test_sparse_tv_by_hand():
    log_pd = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).clamp_min(1e-30).log()
    tv = sparse_tv(log_pd, torch.tensor([[0, 3]]), torch.tensor([[0.6, 0.4]]))
    assert tv.item() == pytest.approx(0.5, abs=1e-6)  # overlap min(.5,.6) + min(0,.4) = .5
    tv_out = sparse_tv(log_pd, torch.tensor([[1, -1]]), torch.tensor([[0.5, 0.5]]))  # -1: outside V'
    assert tv_out.item() == pytest.approx(1 - 0.3, abs=1e-6)
    assert position_weights(3, 4.0).tolist() == pytest.approx([1.0, 0.7788008, 0.6065307])
    assert expected_tau_from_tv([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)


def _chain_dataset(path, vocab_ids, n_seqs=48, seed=0, hidden_dim=32, layers=1, hidden_scale=1.0):
    """A dataset whose responses follow a fixed permutation chain (next = perm[cur]), with
    one-hot target distributions: a drafter must learn it."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor(vocab_ids)
    perm = ids[torch.randperm(len(ids), generator=g)]
    nxt = {int(a): int(b) for a, b in zip(ids, perm)}
    path.mkdir(parents=True, exist_ok=True)
    manifest = {"shards": [], "config": {"target_layer_ids": list(range(layers)), "top_k": 4}}
    for shard in range(2):
        seqs, plens, hid, tki, tkp, val = [], [], [], [], [], []
        for s in range(n_seqs // 2):
            prompt = ids[torch.randint(len(ids), (6,), generator=g)].tolist()
            cur = prompt[-1]
            resp = []
            for _ in range(30):
                cur = nxt[cur]
                resp.append(cur)
            seq = prompt + resp
            seqs.append(seq)
            plens.append(len(prompt))
            hid.append(hidden_scale * torch.randn(len(seq), layers * hidden_dim, generator=g))
            for q in range(len(prompt), len(seq)):  # distribution of the token at q
                others = [t for t in vocab_ids[:4] if t != seq[q]][:3]
                tki.append([seq[q]] + others)
                tkp.append([1.0, 0.0, 0.0, 0.0])
            val.append(s % 8 == 0)
        write_shard(path, manifest, seqs, plens, val, torch.cat(hid), torch.tensor(tki), torch.tensor(tkp))
    write_json_atomic(path / MANIFEST, manifest)
    return nxt


def test_a_few_hundred_steps_drive_the_tv_loss_down(tmp_path, tiny_llama_dir):
    torch.manual_seed(0)
    _chain_dataset(tmp_path / "data", list(range(300, 340)))
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4,
                      markov_rank=16, draft_vocab_size=64, steps=150, seqs_per_step=4, anchors_per_seq=16,
                      lr=1e-2, eval_every=150, save_every=1000, init_from_target=False)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds = CachedDataset(cfg.data)
    tr, t2d = build_drafter(cfg, ds, loaded)
    before = evaluate(tr, ds, cfg, t2d, ds.val)
    summary = train_drafter(cfg)
    after = summary["val"]
    assert before["tv"] > 0.9
    assert after["tv"] < 0.35 * before["tv"], (before["tv"], after["tv"])
    assert after["tau_greedy"] > before["tau_greedy"] + 1.0
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[0]["info"]["draft_vocab"] == 64 and log[-1]["step"] == 150


def test_drafter_loss_matches_a_hand_made_case(tmp_path, tiny_llama_dir):
    """With zero logits over V' (uniform p_d) the TV term is 1 - sum_top-k min(1/V', p_t)."""
    _chain_dataset(tmp_path / "data", list(range(300, 340)), n_seqs=4)
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=3,
                      markov_rank=8, draft_vocab_size=64, init_from_target=False, confidence_head=False)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds = CachedDataset(cfg.data)
    tr, t2d = build_drafter(cfg, ds, loaded)
    with torch.no_grad():
        tr.drafter.norm.weight.zero_()  # h = 0 -> U = 0; W2 starts at zero -> B = 0
    ids, hidden, p, tki, tkp = ds.sequence(ds.train[0])
    loss, st = drafter_loss(tr, [(ids, hidden, p, tki, tkp, torch.tensor([p, p + 3]))], cfg, t2d)
    tv = 1 - 1 / 64
    ce = torch.log(torch.tensor(64.0)).item()
    assert st["tv"] == pytest.approx(tv, abs=1e-5)
    assert st["ce"] == pytest.approx(ce, abs=1e-4)
    assert loss.item() == pytest.approx(0.1 * ce + 0.9 * tv, abs=1e-4)


def test_a_directory_named_twice_is_sampled_twice_as_often(tmp_path):
    """--data A,A,B weights A double: its sequences appear twice in the training list (and in the
    held-out one), the same data both times."""
    _chain_dataset(tmp_path / "a", list(range(300, 340)), n_seqs=8)
    _chain_dataset(tmp_path / "b", list(range(300, 340)), n_seqs=16, seed=1)
    a, b = CachedDataset(str(tmp_path / "a")), CachedDataset(str(tmp_path / "b"))
    ds = CachedDataset(f"{tmp_path / 'a'},{tmp_path / 'a'},{tmp_path / 'b'}")
    assert len(ds.train) == 2 * len(a.train) + len(b.train)
    assert len(ds.val) == 2 * len(a.val) + len(b.val)
    n = len(a.seqs)
    for i in range(n):
        for x, y in zip(ds.sequence(i), ds.sequence(n + i)):  # ids, features, prompt length, top-k
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y
        assert torch.equal(ds.sequence(i)[0], a.sequence(i)[0])
    assert torch.equal(ds.sequence(2 * n)[0], b.sequence(0)[0])


def test_ce_label_target_uses_the_targets_top1_not_the_datas_token(tmp_path, tiny_llama_dir):
    """ce_label="target": the CE term scores the target's most likely token; here that token lies
    outside the draft vocabulary, so the term has nothing to score, while the data's token is in it."""
    _chain_dataset(tmp_path / "data", list(range(300, 340)), n_seqs=4)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds = CachedDataset(str(tmp_path / "data"))
    ids, hidden, p, tki, tkp = ds.sequence(ds.train[0])
    ces = {}
    for label in ("data", "target"):
        cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=3,
                          markov_rank=8, draft_vocab_size=64, init_from_target=False, confidence_head=False,
                          ce_label=label)
        tr, t2d = build_drafter(cfg, ds, loaded)
        with torch.no_grad():
            tr.drafter.norm.weight.zero_()  # uniform p_d over V'
        outside = int((t2d < 0).nonzero()[0])
        tki2 = tki.clone()
        tki2[:, 0] = outside
        _, st = drafter_loss(tr, [(ids, hidden, p, tki2, tkp, torch.tensor([p, p + 3]))], cfg, t2d)
        ces[label] = st["ce"]
    assert ces["data"] == pytest.approx(torch.log(torch.tensor(64.0)).item(), abs=1e-4)
    assert ces["target"] == 0.0
    with pytest.raises(ValueError, match="ce_label"):
        drafter_loss(tr, [(ids, hidden, p, tki, tkp, torch.tensor([p]))],
                     TrainConfig(data="", out="", block_size=3, ce_label="labels"), t2d)


@pytest.mark.parametrize("window", [None, 6])
def test_training_forward_is_the_serving_backbone(tmp_path, tiny_llama_dir, window):
    """The packed training forward (one masked call per sequence) equals the engine's backbone
    run block by block with the context K/V of positions < anchor (the last `window` of them
    with a context window, which the exported drafter keeps in its config)."""
    _chain_dataset(tmp_path / "data", list(range(300, 340)), n_seqs=4)
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4,
                      markov_rank=8, draft_vocab_size=64, num_layers=2, init_from_target=False, context_window=window)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds = CachedDataset(cfg.data)
    tr, _ = build_drafter(cfg, ds, loaded)
    assert tr.drafter.config.draft_context_window == window
    ids, hidden, p, _, _ = ds.sequence(ds.train[0])
    anchors = torch.tensor([p, p + 5, len(ids) - 2])
    with torch.no_grad():
        got = tr.forward_sequence(ids, hidden, anchors, 4)
        d = tr.export()
        h_ctx = d.context_features([hidden.float()])
        kv = d.context_kv(h_ctx, torch.arange(len(ids)))
        for i, a in enumerate(anchors.tolist()):
            lo = max(0, a - window) if window else 0
            ctx = [(k[None, lo:a], v[None, lo:a]) for k, v in kv]
            ref = d.backbone(ids[a:a + 1], torch.tensor([a]), ctx, torch.ones(1, a - lo, dtype=torch.bool), 4)
            assert torch.allclose(got[i], ref[0], atol=1e-4), (got[i] - ref[0]).abs().max()
    if window:  # a warm start keeps the saved drafter's window, or is told another (0: none)
        from dspark_serve.models.dspark import save_drafter

        save_drafter(d, tmp_path / "saved")
        for override, want in ((None, window), (3, 3), (0, None)):
            warm = TrainConfig(data=cfg.data, out=str(tmp_path / "run2"), model=tiny_llama_dir,
                               init_drafter=str(tmp_path / "saved"), context_window=override)
            assert build_drafter(warm, ds, loaded)[0].drafter.config.draft_context_window == want
        assert json.loads((tmp_path / "saved" / "config.json").read_text())["draft_context_window"] == window


def test_gen_data_resumes_and_a_trained_drafter_serves_losslessly(tmp_path, tiny_llama_dir):
    from dspark_serve.engine import LLM, SamplingParams

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"turns": [f"Say something about {w}."]}) + "\n"
                               for w in ["cats", "dogs", "rain", "tea", "maps", "code"]))
    cfg = GenDataConfig(out=str(tmp_path / "data"), model=tiny_llama_dir, prompts=str(prompts), num_prompts=3,
                        shard_size=3, max_tokens=12, temperature=0.0, target_layer_ids=(0,), top_k=8,
                        dtype="float32", val_fraction=0.5)
    m1 = gen_data(cfg)
    assert len(m1["shards"]) == 1
    cfg.num_prompts = 6
    m2 = gen_data(cfg)  # resumes: one more shard, the first untouched
    assert [s["file"] for s in m2["shards"]] == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert m2["shards"][0] == m1["shards"][0]
    assert gen_data(cfg) == read_manifest(tmp_path / "data")  # nothing left to do
    ds = CachedDataset(cfg.out)
    assert len(ds.seqs) == 6 and all(h.shape[1] == 32 for h in ds.hidden)
    # greedy responses: the cached top-1 of the teacher pass IS the next response token
    for i in range(len(ds.seqs)):
        ids, _, p, tki, _ = ds.sequence(i)
        assert tki[:, 0].tolist() == ids[p:].tolist()

    tcfg = TrainConfig(data=cfg.out, out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4, markov_rank=8,
                       draft_vocab_size=32, steps=4, seqs_per_step=2, anchors_per_seq=4, eval_every=2, save_every=2)
    train_drafter(tcfg)
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 4
    drafter_dir = tmp_path / "run" / "drafter"
    target = load_model(tiny_llama_dir, dtype="float32").model
    d = load_drafter(drafter_dir, target)
    assert d.config.draft_vocab_size == 32 and d.d2t.dtype == torch.long and d.d2t.numel() == 32

    plain = LLM(tiny_llama_dir, dtype="float32", num_threads=1)
    spec = LLM(tiny_llama_dir, dtype="float32", num_threads=1,
               speculative_config={"model": str(drafter_dir), "verification": "fixed"})
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    texts = ["Hello", "One two three", "Tell me a story"]
    a = [o.outputs[0].token_ids for o in plain.generate(texts, sp)]
    b = [o.outputs[0].token_ids for o in spec.generate(texts, sp)]
    assert a == b
    assert spec.engine.stats.spec_num_draft_tokens > 0
    # sampled requests run through the scatter of the restricted draft distribution
    out = spec.generate(texts, SamplingParams(temperature=1.0, max_tokens=16, seed=3))
    assert all(len(o.outputs[0].token_ids) == 16 or o.outputs[0].finish_reason == "stop" for o in out)

    # STS on the held-out split, written beside the drafter and picked up by the engine
    from dspark_serve.scheduler.calibration import STSCalibrator
    from dspark_serve.training.evaluate import calibrate_drafter

    res = calibrate_drafter(str(drafter_dir), cfg.out, num_prompts=3, max_tokens=8, model=tiny_llama_dir, num_threads=1)
    assert res["rounds"] > 0 and res["prompts"] >= 1
    cal = STSCalibrator.from_json(drafter_dir / "calibration.json")
    assert len(cal.temperatures) == 4


def test_teacher_pass_packs_by_length_and_returns_the_callers_order(tiny_llama_dir):
    """Several passes (a small token cap) over sequences of mixed lengths give, per sequence, the
    features and top-k of that sequence run alone with a full softmax."""
    from dspark_serve.models.attention import AttentionMetadata

    model = load_model(tiny_llama_dir, dtype="float32").model
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (9, 30, 5, 17, 12)]
    plens = [3, 10, 2, 4, 11]
    hid, ids, probs = teacher_pass(model, seqs, plens, [0], 5, torch.device("cpu"), max_tokens_per_pass=40)
    t = r = 0
    for s, p in zip(seqs, plens):
        n = len(s)
        kv = torch.zeros(model.config.num_layers, 2, 32, 1, model.config.head_dim)
        meta = AttentionMetadata([n], [n], [[0, 1]], 16)
        logits, aux = model(torch.tensor(s), meta.positions(), meta, [(kv[l, 0], kv[l, 1]) for l in range(len(kv))],
                            logits_indices=torch.arange(p - 1, n - 1), aux_layer_ids=[0])
        ref_p, ref_i = torch.softmax(logits.float(), -1).topk(5, -1)
        assert torch.allclose(hid[t:t + n].float(), aux[0].to(torch.bfloat16).float())
        assert ids[r:r + n - p].tolist() == ref_i.tolist()
        assert torch.allclose(probs[r:r + n - p].float(), ref_p, atol=1e-3)
        t, r = t + n, r + n - p
    assert (t, r) == (hid.shape[0], ids.shape[0])


def test_gen_data_match_selects_prompts_by_content(tmp_path, tiny_llama_dir):
    """--match: only prompts whose user message matches are used, under their source indices; the
    pattern is part of the dataset's settings (a resume with another one is refused)."""
    prompts = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Name a colour.", "response": "Blue."},
            {"prompt": "Write a Python function.", "response": "def f(): pass"},
            {"prompt": "Say hi.", "response": "Hi there!"},
            {"prompt": "Solve the equation x + 1 = 2.", "response": "x = 1"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = GenDataConfig(out=str(tmp_path / "data"), model=tiny_llama_dir, prompts=str(prompts), num_prompts=4,
                        shard_size=8, max_tokens=12, target_layer_ids=(0,), top_k=8, dtype="float32",
                        val_fraction=0.0, responses="dataset", match="(?i)python|equation")
    m = gen_data(cfg)
    assert [s["prompt_indices"] for s in m["shards"]] == [[1, 3]]
    assert m["config"]["match"] == "(?i)python|equation"
    cfg.match = "colour"
    with pytest.raises(SystemExit, match="match"):
        gen_data(cfg)  # the same --out with another selection
    cfg.out, cfg.match = str(tmp_path / "data2"), "(unclosed"
    with pytest.raises(SystemExit, match="regular expression"):
        gen_data(cfg)
    # a dataset written before --match existed (no "match" in its settings) resumes without one
    old = read_manifest(tmp_path / "data")
    del old["config"]["match"]
    write_json_atomic(tmp_path / "data" / MANIFEST, old)
    cfg.out, cfg.match = str(tmp_path / "data"), None
    assert [s["prompt_indices"] for s in gen_data(cfg)["shards"]] == [[1, 3], [0, 2]]


@pytest.mark.parametrize("responses", ["dataset", "target"])
def test_gen_data_min_prompt_tokens_keeps_only_long_prompts(tmp_path, tiny_llama_dir, default_tokenizer, responses):
    """--min-prompt-tokens: a long-context dataset; prompts outside [min, max] (chat template
    included) are skipped under their indices, and the bound is part of the dataset's settings."""
    prompts = tmp_path / "pairs.jsonl"
    long_text = "Summarise this text: " + " ".join(["the quick brown fox jumps over the lazy dog"] * 6)
    rows = [{"prompt": "Say hi.", "response": "Hi there!"},
            {"prompt": long_text, "response": "A fox."},
            {"prompt": long_text + " " + long_text, "response": "Two foxes."},
            {"prompt": "Name a colour.", "response": "Blue."}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    lens = [len(apply_chat_template(default_tokenizer, [{"role": "user", "content": r["prompt"]}])) for r in rows]
    lo, hi = lens[1], lens[2] - 1  # keeps row 1 only: rows 0 and 3 are too short, row 2 too long
    assert lens[0] < lo and lens[3] < lo
    cfg = GenDataConfig(out=str(tmp_path / "data"), model=tiny_llama_dir, prompts=str(prompts), num_prompts=4,
                        shard_size=8, max_tokens=4, target_layer_ids=(0,), top_k=8, dtype="float32",
                        val_fraction=0.0, responses=responses, min_prompt_tokens=lo, max_prompt_tokens=hi,
                        kv_cache_memory=8 << 20)
    m = gen_data(cfg)
    assert [s["prompt_indices"] for s in m["shards"]] == [[1]]
    assert sorted(m["shards"][0]["skipped_indices"]) == [0, 2, 3]
    assert m["config"]["min_prompt_tokens"] == lo
    assert CachedDataset(cfg.out).sequence(0)[2] == lens[1]  # the prompt kept whole
    cfg.min_prompt_tokens = 0
    with pytest.raises(SystemExit, match="min_prompt_tokens"):
        gen_data(cfg)  # the same --out with another bound
    cfg.out, cfg.min_prompt_tokens = str(tmp_path / "data2"), hi + 1
    with pytest.raises(SystemExit, match="min-prompt-tokens"):
        gen_data(cfg)  # an empty range is an error, not a dataset of nothing


def test_gen_data_teacher_forces_the_datasets_own_responses(tmp_path, tiny_llama_dir, default_tokenizer):
    """--responses dataset: no generation; the response is the dataset's text, the end-of-turn token
    added when it fits, cut (without it) at max_tokens; records without a response are skipped."""
    prompts = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Name a colour.", "response": "Blue."},
            {"turns": ["Count to twenty.", " ".join(str(i) for i in range(1, 21))]},
            {"prompt": "No answer here."},
            {"prompt": "Say hi.", "response": "Hi there!"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = GenDataConfig(out=str(tmp_path / "data"), model=tiny_llama_dir, prompts=str(prompts), num_prompts=4,
                        shard_size=2, max_tokens=12, target_layer_ids=(0,), top_k=8, dtype="float32",
                        val_fraction=0.0, responses="dataset")
    m = gen_data(cfg)
    assert [s["prompt_indices"] for s in m["shards"]] == [[0, 1], [3]]
    assert m["shards"][1]["skipped_indices"] == [2] and m["config"]["responses"] == "dataset"
    assert all(s["gen_s"] == 0.0 for s in m["shards"])
    ds = CachedDataset(cfg.out)
    eos = default_tokenizer.eos_token_id
    want = [default_tokenizer.encode("Blue.", add_special_tokens=False) + [eos],
            default_tokenizer.encode(rows[1]["turns"][1], add_special_tokens=False)[:12],
            default_tokenizer.encode("Hi there!", add_special_tokens=False) + [eos]]
    got = []
    for i in range(len(ds.seqs)):
        ids, hidden, p, tki, tkp = ds.sequence(i)
        got.append(ids[p:].tolist())
        assert tki.shape == (len(ids) - p, 8) and hidden.shape == (len(ids), 32)
    assert got == want and len(want[1]) == 12 and eos not in want[1]
    assert m["shards"][0]["finished_with_eos"] == 1
    assert gen_data(cfg) == read_manifest(tmp_path / "data")  # resumes with nothing left to do
    cfg.responses = "target"
    with pytest.raises(SystemExit, match="responses"):  # another kind of data never mixes into a dataset
        gen_data(cfg)


def test_a_time_budget_ends_the_run_with_its_decay_finished(tmp_path, tiny_llama_dir):
    _chain_dataset(tmp_path / "data", list(range(300, 340)), n_seqs=8)
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=3,
                      markov_rank=8, draft_vocab_size=64, steps=100000, seqs_per_step=2, anchors_per_seq=4,
                      init_from_target=False, time_budget_s=2.0, eval_every=100000, save_every=100000)
    summary = train_drafter(cfg)
    assert 1 <= summary["info"]["steps_done"] < 100000
    log = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()[1:]]
    assert log[-1]["progress"] >= 1.0 and log[-1]["lr"] == pytest.approx(cfg.lr * cfg.min_lr_ratio, rel=1e-3)
    assert "val" in log[-1] and (tmp_path / "run" / "checkpoint.pt").exists()
    assert (tmp_path / "run" / "drafter" / "model.safetensors").exists()


def test_a_warm_start_continues_from_the_saved_drafter(tmp_path, tiny_llama_dir):
    """--init-drafter: the saved drafter (fc folded at export) is unfolded for the new data's
    feature scale, so before any step it computes what the first run ended with."""
    _chain_dataset(tmp_path / "data", list(range(300, 340)))
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4,
                      markov_rank=16, draft_vocab_size=64, steps=80, seqs_per_step=4, anchors_per_seq=16,
                      lr=1e-2, eval_every=80, save_every=1000, init_from_target=False)
    first = train_drafter(cfg)["val"]
    assert first["tau_greedy"] > 1.5
    # the same chain with features scaled per dimension (0.2x..20x): a different scale to unfold for
    dim_scale = torch.logspace(-0.7, 1.3, 32)
    _chain_dataset(tmp_path / "data2", list(range(300, 340)), hidden_scale=dim_scale)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds1, ds2 = CachedDataset(cfg.data), CachedDataset(str(tmp_path / "data2"))
    cfg2 = TrainConfig(data=str(tmp_path / "data2"), out=str(tmp_path / "run2"), model=tiny_llama_dir, steps=20,
                       seqs_per_step=4, anchors_per_seq=16, lr=1e-3, eval_every=20, save_every=1000,
                       init_drafter=str(tmp_path / "run" / "drafter"))
    tr, t2d = build_drafter(cfg2, ds2, loaded)
    assert tr.drafter.config.block_size == 4 and tr.drafter.config.draft_vocab_size == 64
    assert torch.allclose(tr.feat_scale, dim_scale * tr.feat_scale[0] / dim_scale[0], rtol=0.15)
    saved = TrainableDrafter(load_drafter(tmp_path / "run" / "drafter", target=loaded.model), torch.ones(32))
    ids, hidden, p, _, _ = ds2.sequence(ds2.train[0])
    anchors = torch.tensor([p, p + 5, len(ids) - 2])
    with torch.no_grad():  # any features x: (W_saved * s2) (x / s2) = W_saved x
        assert torch.allclose(tr.forward_sequence(ids, hidden, anchors, 4),
                              saved.forward_sequence(ids, hidden, anchors, 4), atol=1e-4)
    again = evaluate(tr, ds1, cfg, t2d, ds1.val)
    assert again["tau_greedy"] == pytest.approx(first["tau_greedy"], abs=0.1)  # bf16 weights on disk
    cont = train_drafter(cfg2)
    assert cont["val"]["tau_greedy"] > 1.5
    log = [json.loads(x) for x in (tmp_path / "run2" / "train_log.jsonl").read_text().splitlines()]
    # the log starts from the saved drafter's own held-out score, before any step
    assert log[1]["step"] == 0 and log[1]["val"]["tau_greedy"] > 1.5 and log[2]["step"] == 1
    with pytest.raises(ValueError, match="target layers"):
        _chain_dataset(tmp_path / "data3", list(range(300, 340)), layers=2, n_seqs=8)
        build_drafter(cfg2, CachedDataset(str(tmp_path / "data3")), loaded)


def test_a_warm_start_grows_layers_and_vocabulary_from_the_saved_function(tmp_path, tiny_llama_dir):
    """--grow-layers / --grow-vocab: the new layer is an identity (zeroed output projections) and
    the saved tokens keep their Markov rows, so before any step the grown drafter's hidden states
    and the saved tokens' logits are the saved drafter's; then it trains, resumes and exports."""
    _chain_dataset(tmp_path / "data", list(range(300, 340)))
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4,
                      markov_rank=16, draft_vocab_size=64, steps=40, seqs_per_step=4, anchors_per_seq=16,
                      lr=1e-2, eval_every=40, save_every=1000, init_from_target=False)
    train_drafter(cfg)
    _chain_dataset(tmp_path / "data2", list(range(300, 380)), seed=1)  # 40 token ids the drafter lacks
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds2 = CachedDataset(str(tmp_path / "data2"))
    cfg2 = TrainConfig(data=str(tmp_path / "data2"), out=str(tmp_path / "run2"), model=tiny_llama_dir, steps=20,
                       seqs_per_step=4, anchors_per_seq=16, lr=1e-2, eval_every=1000, save_every=10,
                       init_drafter=str(tmp_path / "run" / "drafter"), grow_layers=2, grow_vocab=96)
    tr, t2d = build_drafter(cfg2, ds2, loaded)
    d = tr.drafter
    assert len(d.layers) == d.config.num_hidden_layers == 2 and d.config.draft_vocab_size == d.d2t.numel() == 96
    saved = load_drafter(tmp_path / "run" / "drafter", target=loaded.model)
    old, new = saved.d2t.tolist(), d.d2t.tolist()
    assert new == sorted(new) and set(old) <= set(new) and set(new) - set(old) <= set(range(340, 380))
    assert t2d[torch.tensor(new)].tolist() == list(range(96))
    ids, hidden, p, _, _ = ds2.sequence(ds2.train[0])
    anchors = torch.tensor([p, p + 5, len(ids) - 2])
    with torch.no_grad():
        h = tr.forward_sequence(ids, hidden, anchors, 4)
        assert torch.allclose(h, TrainableDrafter(saved, torch.ones(32)).forward_sequence(ids, hidden, anchors, 4),
                              atol=1e-4)
        where = torch.searchsorted(d.d2t, saved.d2t)
        assert torch.allclose(d.base_logits(h)[..., where], saved.base_logits(h))
        w2 = d.markov_head.markov_w2.weight
        assert torch.equal(w2[where], saved.markov_head.markov_w2.weight)
        fresh = torch.ones(96, dtype=torch.bool)
        fresh[where] = False
        assert int(fresh.sum()) == 32 and not w2[fresh].any()
    train_drafter(cfg2)  # 20 steps, checkpoint at 10 and 20
    cfg2.steps = 30
    summary = train_drafter(cfg2)  # resumes: the checkpoint's shapes are the grown ones
    assert summary["info"]["steps_done"] == 30
    out = load_drafter(tmp_path / "run2" / "drafter", target=loaded.model)
    assert len(out.layers) == 2 and out.d2t.tolist() == new
    assert out.layers[1].self_attn.o_proj.weight.abs().max() > 0  # the new layer trained
    with pytest.raises(ValueError, match="already"):
        cfg2.grow_vocab = 32
        build_drafter(cfg2, ds2, loaded)
    with pytest.raises(ValueError, match="init-drafter"):
        build_drafter(TrainConfig(data=cfg2.data, out=str(tmp_path / "run3"), model=tiny_llama_dir, grow_layers=2),
                      ds2, loaded)


def test_a_warm_start_gates_the_markov_head_without_changing_its_function(tmp_path, tiny_llama_dir):
    """--gate-head: a vanilla Markov head becomes the gated one with the same bias at step 0 (gate
    constant, W2 divided by it); the gate then trains, resume rebuilds it, and the export is gated."""
    from dspark_serve.training.trainer import gate_markov_head

    _chain_dataset(tmp_path / "data", list(range(300, 340)))
    cfg = TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model=tiny_llama_dir, block_size=4,
                      markov_rank=16, draft_vocab_size=64, steps=30, seqs_per_step=4, anchors_per_seq=16,
                      lr=1e-2, eval_every=1000, save_every=1000, init_from_target=False)
    train_drafter(cfg)
    loaded = load_model(tiny_llama_dir, dtype="float32")
    ds = CachedDataset(str(tmp_path / "data"))
    cfg2 = TrainConfig(data=cfg.data, out=str(tmp_path / "run2"), model=tiny_llama_dir, steps=20, seqs_per_step=4,
                       anchors_per_seq=16, lr=1e-2, eval_every=1000, save_every=10,
                       init_drafter=str(tmp_path / "run" / "drafter"), gate_head=True)
    tr, _ = build_drafter(cfg2, ds, loaded)
    mh = tr.drafter.markov_head
    assert mh.kind == "gated" and tr.drafter.config.markov_head_type == "gated"
    saved = load_drafter(tmp_path / "run" / "drafter", target=loaded.model)
    g = torch.Generator().manual_seed(0)
    prev = torch.randint(0, 300, (5,), generator=g)
    h = torch.randn(5, 32, generator=g)
    with torch.no_grad():
        want, _ = saved.markov_head.step(saved.markov_head.markov_w1(prev), h, None)
        got, _ = mh.step(mh.markov_w1(prev), h, None)
    assert want.abs().max() > 0 and torch.allclose(got, want, atol=1e-5)
    summary = train_drafter(cfg2)
    assert summary["info"]["steps_done"] == 20
    cfg2.steps = 30
    assert train_drafter(cfg2)["info"]["steps_done"] == 30  # resumes into the gated shapes
    out = load_drafter(tmp_path / "run2" / "drafter", target=loaded.model)
    assert out.config.markov_head_type == "gated" and out.markov_head.gate_proj.weight.abs().max() > 0
    with pytest.raises(ValueError, match="vanilla"):
        gate_markov_head(out)  # already gated
    with pytest.raises(ValueError, match="init-drafter"):
        build_drafter(TrainConfig(data=cfg.data, out=str(tmp_path / "run3"), model=tiny_llama_dir, gate_head=True),
                      ds, loaded)


def test_map_tensor_reads_what_safetensors_wrote(tmp_path):
    """The features are memory-mapped from the shard files: every dtype gen-data writes, and an
    empty tensor, come back equal to safetensors' own reader."""
    from safetensors.torch import load_file, save_file

    from dspark_serve.training.trainer import map_tensor

    g = torch.Generator().manual_seed(0)
    tensors = {"hidden": torch.randn(7, 5, generator=g).to(torch.bfloat16), "probs": torch.rand(3, 4).half(),
               "ids": torch.randint(0, 100, (6,), dtype=torch.int32), "lens": torch.tensor([3, 4]),
               "f32": torch.randn(2, 2), "empty": torch.zeros(0, 4, dtype=torch.int32)}
    save_file(tensors, str(tmp_path / "s.safetensors"))
    ref = load_file(str(tmp_path / "s.safetensors"))
    for name in tensors:
        got = map_tensor(tmp_path / "s.safetensors", name)
        assert got.dtype == ref[name].dtype and torch.equal(got, ref[name]), name


def test_cached_dataset_maps_features_across_shards(tmp_path):
    """Sequences read their features from their own shard's mapping; the feature RMS samples
    every step-th token of the whole dataset, as if the shards were one array."""
    from safetensors.torch import load_file

    _chain_dataset(tmp_path / "data", list(range(300, 340)), n_seqs=8)
    ds = CachedDataset(str(tmp_path / "data"))
    files = sorted((tmp_path / "data").glob("shard-*.safetensors"))
    assert len(ds.hidden) == len(files) == 2
    full = torch.cat([load_file(str(f))["hidden"] for f in files])
    ids = torch.cat([load_file(str(f))["input_ids"] for f in files]).long()
    off = 0
    for i in range(len(ds.seqs)):
        seq_ids, hidden, _, _, _ = ds.sequence(i)
        n = len(seq_ids)
        assert torch.equal(hidden, full[off:off + n]) and torch.equal(seq_ids, ids[off:off + n])
        off += n
    assert off == full.shape[0]
    want = full[::7].float().pow(2).mean(0).sqrt().clamp_min(1e-3)
    assert torch.allclose(ds.feature_rms(sample=full.shape[0] // 7), want)


def test_training_device_resolution():
    """--device auto trains on CUDA when torch sees a GPU, else on the CPU; an explicit cuda
    device without one is a clear error, not a crash deep inside the first step."""
    from dspark_serve.training.trainer import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="no CUDA device"):
            resolve_device("cuda")
