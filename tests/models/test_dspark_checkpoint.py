"""DeepSpec DSpark checkpoint format: exact field and tensor names, every variant, clear errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from dspark_serve.models.dspark import load_drafter, save_drafter
from dspark_serve.models.loader import load_model

D, V, R, INTER, HEADS, KV, HD = 32, None, 16, 64, 2, 1, 16


def deepspec_checkpoint(path, target_cfg, head_type="vanilla", conf_with_markov=True, with_shared=True, layers=2):
    """Write a drafter exactly as DeepSpec names things (REFERENCE.md section 6), random weights."""
    v, d = target_cfg.vocab_size, target_cfg.hidden_size
    ids = [0]
    cfg = {
        "architectures": ["Qwen3DSparkModel"], "model_type": "qwen3", "hidden_size": d,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": target_cfg.num_heads,
        "num_key_value_heads": target_cfg.num_kv_heads, "head_dim": target_cfg.head_dim, "vocab_size": v,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 1024,
        "num_target_layers": target_cfg.num_layers, "block_size": 5, "mask_token_id": 7,
        "target_layer_ids": ids, "num_anchors": 512, "enable_confidence_head": True,
        "confidence_head_with_markov": conf_with_markov, "markov_rank": R, "markov_head_type": head_type,
        "tie_word_embeddings": False, "attention_bias": False,
    }
    hq, hkv, hd = target_cfg.num_heads, target_cfg.num_kv_heads, target_cfg.head_dim
    g = torch.Generator().manual_seed(0)
    t = {}
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    for i in range(layers):
        p = f"layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rnd(hq * hd, d)
        t[p + "self_attn.k_proj.weight"] = rnd(hkv * hd, d)
        t[p + "self_attn.v_proj.weight"] = rnd(hkv * hd, d)
        t[p + "self_attn.o_proj.weight"] = rnd(d, hq * hd)
        t[p + "self_attn.q_norm.weight"] = rnd(hd)
        t[p + "self_attn.k_norm.weight"] = rnd(hd)
        t[p + "mlp.gate_proj.weight"] = rnd(INTER, d)
        t[p + "mlp.up_proj.weight"] = rnd(INTER, d)
        t[p + "mlp.down_proj.weight"] = rnd(d, INTER)
        t[p + "input_layernorm.weight"] = rnd(d)
        t[p + "post_attention_layernorm.weight"] = rnd(d)
    t["norm.weight"] = rnd(d)
    t["hidden_norm.weight"] = rnd(d)
    t["fc.weight"] = rnd(d, len(ids) * d)
    t["markov_head.markov_w1.weight"] = rnd(v, R)
    t["markov_head.markov_w2.weight"] = rnd(v, R)
    if head_type == "gated":
        t["markov_head.gate_proj.weight"] = rnd(R, d + R)
        t["markov_head.gate_proj.bias"] = rnd(R)
    if head_type == "rnn":
        t["markov_head.joint_proj.weight"] = rnd(3 * R, 2 * R + d)
        t["markov_head.joint_proj.bias"] = rnd(3 * R)
    cin = d + R if conf_with_markov else d
    t["confidence_head.proj.weight"] = rnd(1, cin)
    t["confidence_head.proj.bias"] = rnd(1)
    if with_shared:
        t["embed_tokens.weight"] = rnd(v, d)
        t["lm_head.weight"] = rnd(v, d)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(t, str(path / "model.safetensors"))
    return t


@pytest.fixture(scope="module")
def target(tiny_llama_dir):
    return load_model(tiny_llama_dir, dtype="float32").model


@pytest.mark.parametrize("head_type,conf_with_markov", [("vanilla", True), ("gated", True), ("rnn", True), ("vanilla", False)])
def test_every_tensor_lands(tmp_path, target, head_type, conf_with_markov):
    tensors = deepspec_checkpoint(tmp_path / "ck", target.config, head_type, conf_with_markov)
    drafter = load_drafter(tmp_path / "ck", target=target)
    params = dict(drafter.named_parameters())
    for name, value in tensors.items():
        if name in ("embed_tokens.weight", "lm_head.weight"):
            continue  # shared with the target, never duplicated
        assert torch.equal(params.pop(name), value), name
    assert not params  # nothing left unloaded
    # the target's embedding / lm_head are used, not the checkpoint's copies
    assert drafter._embed is target.embed_tokens
    assert all(p.data_ptr() != target.embed_tokens.weight.data_ptr() for p in drafter.parameters())


def test_round_trip_in_our_format(tmp_path, target):
    deepspec_checkpoint(tmp_path / "a", target.config, "rnn")
    a = load_drafter(tmp_path / "a", target=target)
    save_drafter(a, tmp_path / "b", include_shared=True)
    b = load_drafter(tmp_path / "b", target=target)
    cfg_a = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg_b = json.loads((tmp_path / "b" / "config.json").read_text())
    for key in cfg_a:
        assert cfg_b[key] == cfg_a[key], key
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)


def test_the_context_window_round_trips_and_is_checked(tmp_path, target):
    deepspec_checkpoint(tmp_path / "a", target.config)
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    assert "draft_context_window" not in cfg  # DeepSpec's drafters have none: the whole context
    assert load_drafter(tmp_path / "a", target=target).config.draft_context_window is None
    cfg["draft_context_window"] = 256
    (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
    a = load_drafter(tmp_path / "a", target=target)
    assert a.config.draft_context_window == 256
    save_drafter(a, tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["draft_context_window"] == 256
    for bad in (0, -3, 1.5, "256"):
        cfg["draft_context_window"] = bad
        (tmp_path / "a" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="draft_context_window"):
            load_drafter(tmp_path / "a", target=target)


def test_unknown_and_missing_tensors_are_errors(tmp_path, target):
    from safetensors.torch import load_file

    deepspec_checkpoint(tmp_path / "ck", target.config)
    f = tmp_path / "ck" / "model.safetensors"
    sd = load_file(str(f))
    save_file({**sd, "layers.0.mystery.weight": torch.zeros(2)}, str(f))
    with pytest.raises(ValueError, match="unknown tensors.*mystery"):
        load_drafter(tmp_path / "ck", target=target)
    del sd["fc.weight"]
    save_file(sd, str(f))
    with pytest.raises(ValueError, match="lacks tensors.*fc.weight"):
        load_drafter(tmp_path / "ck", target=target)


def test_mismatched_target_is_a_clear_error(tmp_path, target):
    deepspec_checkpoint(tmp_path / "ck", target.config)
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["vocab_size"] = 1234
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="vocab size 1234"):
        load_drafter(tmp_path / "ck", target=target)
