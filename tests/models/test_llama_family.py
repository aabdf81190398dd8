"""Our Llama-family forward equals transformers' on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch

from dspark_testing import make_tiny_model
from dspark_serve.models.attention import AttentionMetadata
from dspark_serve.models.loader import load_model

FAMILIES = {
    "llama": dict(),
    "llama-untied-bias": dict(tie_word_embeddings=False, attention_bias=True),
    "qwen2-sliding": dict(use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(tie_word_embeddings=False),
    "llama3-rope": dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 64}),
}


def _pool(cfg, blocks=32, bs=16):
    return [
        (torch.zeros(blocks * bs, cfg.num_kv_heads, cfg.head_dim), torch.zeros(blocks * bs, cfg.num_kv_heads, cfg.head_dim))
        for _ in range(cfg.num_layers)
    ]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, default_tokenizer):
    name = request.param
    model_type = name.split("-")[0].replace("llama3", "llama")
    path = tmp_path_factory.mktemp(name)
    hf = make_tiny_model(path, model_type, default_tokenizer, shard=True, **FAMILIES[name])
    return name, hf, load_model(str(path), dtype="float32")


def test_sharded_checkpoint_loads_every_tensor(family):
    name, hf, lm = family
    # save_pretrained split it into several files with an index
    assert lm.config.model_type in ("llama", "qwen2", "qwen3")
    if name == "qwen3":
        assert lm.config.qk_norm and lm.model.lm_head is not None
    if name == "qwen2-sliding":
        assert lm.config.sliding_windows == [None, 8, 8]


def test_prefill_logits_and_hidden_states_match_transformers(family):
    _, hf, lm = family
    torch.manual_seed(1)
    ids = torch.randint(0, 2000, (40,))
    meta = AttentionMetadata([40], [40], [[0, 1, 2]], 16)
    logits, aux = lm.model(ids, meta.positions(), meta, _pool(lm.config), aux_layer_ids=[-1, 0, 1])
    with torch.no_grad():
        ref = hf(ids[None], output_hidden_states=True)
    torch.testing.assert_close(logits, ref.logits[0], atol=1e-4, rtol=1e-4)
    for got, want in zip(aux, ref.hidden_states[:3]):
        torch.testing.assert_close(got, want[0], atol=1e-4, rtol=1e-4)


def test_mixed_flat_batch_matches_separate_runs(family):
    """A prefill chunk, a decode and a 4-token block of three sequences in ONE forward."""
    _, hf, lm = family
    torch.manual_seed(2)
    seqs = [torch.randint(0, 2000, (n,)) for n in (23, 30, 12)]
    with torch.no_grad():
        refs = [hf(s[None]).logits[0] for s in seqs]
    pool = _pool(lm.config)
    tables = [[0, 1], [2, 3], [4]]
    # Step 1: prefill the first part of each sequence (20, 29, 8 tokens).
    first = [20, 29, 8]
    meta = AttentionMetadata(first, first, tables, 16)
    ids = torch.cat([s[:n] for s, n in zip(seqs, first)])
    lm.model(ids, meta.positions(), meta, pool)
    # Step 2: the rest, all in one forward: 3 tokens, 1 token (a decode), 4 tokens.
    rest = [len(s) - n for s, n in zip(seqs, first)]
    meta = AttentionMetadata(rest, [len(s) for s in seqs], tables, 16)
    ids = torch.cat([s[n:] for s, n in zip(seqs, first)])
    logits, _ = lm.model(ids, meta.positions(), meta, pool)
    got = torch.split(logits, rest)
    for g, r, n in zip(got, refs, first):
        torch.testing.assert_close(g, r[n:], atol=1e-4, rtol=1e-4)


def test_sliding_window_is_applied(tmp_path, default_tokenizer):
    """The same weights with and without the window give different logits past the window."""
    hf = make_tiny_model(tmp_path / "w", "qwen2", default_tokenizer,
                         use_sliding_window=True, sliding_window=4, max_window_layers=0)
    lm = load_model(str(tmp_path / "w"), dtype="float32")
    ids = torch.randint(0, 2000, (20,))
    meta = AttentionMetadata([20], [20], [[0, 1]], 16)
    windowed, _ = lm.model(ids, meta.positions(), meta, _pool(lm.config))
    for layer in lm.model.layers:
        layer.self_attn.window = None
    meta = AttentionMetadata([20], [20], [[0, 1]], 16)
    full, _ = lm.model(ids, meta.positions(), meta, _pool(lm.config))
    torch.testing.assert_close(windowed[:4], full[:4])
    assert (windowed[8:] - full[8:]).abs().max() > 1e-3
    with torch.no_grad():
        ref = hf(ids[None]).logits[0]
    torch.testing.assert_close(windowed, ref, atol=1e-4, rtol=1e-4)


def test_unknown_or_missing_tensors_are_clear_errors(family):
    _, hf, lm = family
    sd = dict(hf.state_dict())
    with pytest.raises(ValueError, match="does not know"):
        lm.model.load_weights(list(sd.items()) + [("model.layers.0.extra.weight", torch.zeros(1))])
    missing = [(k, v) for k, v in sd.items() if "layers.1.mlp.down_proj" not in k]
    with pytest.raises(ValueError, match="lacks"):
        lm.model.load_weights(missing)


def test_rmsnorm_half_types_match_hf_bitwise():
    """RMSNorm in bf16 / fp16 uses the fused float32 kernel; it must give HF's bits exactly."""
    from dspark_serve.models.llama import RMSNorm

    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        norm = RMSNorm(576, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(576, generator=gen))
        for n in (1, 7, 300):
            x = (torch.randn(n, 576, generator=gen) * 3).to(dtype)
            xf = x.float()
            hf = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
            assert torch.equal(norm(x), hf)
