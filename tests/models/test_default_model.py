"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own loader."""

from __future__ import annotations

import os

import pytest
import torch

from dspark_testing import CHAT_PROMPTS
from dspark_serve.engine import SamplingParams, apply_chat_template
from dspark_serve.models.attention import AttentionMetadata
from dspark_serve.models.loader import default_model_path

LOGIT_ATOL = 1e-3  # float32, same weights; observed max difference is ~1e-5 or below


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)
    return model.eval()


def _chat_ids(tok, text):
    return apply_chat_template(tok, [{"role": "user", "content": text}])


def test_per_position_logits_match(llm_fp32, hf_model):
    tok = llm_fp32.get_tokenizer()
    ids = _chat_ids(tok, "Explain why the sky is blue, briefly.")
    n = len(ids)
    eng = llm_fp32.engine
    cfg = eng.model_config
    pool = [(torch.zeros(8 * 16, cfg.num_kv_heads, cfg.head_dim), torch.zeros(8 * 16, cfg.num_kv_heads, cfg.head_dim))
            for _ in range(cfg.num_layers)]
    meta = AttentionMetadata([n], [n], [list(range(8))], 16)
    ours, _ = eng.runner.model(torch.tensor(ids), meta.positions(), meta, pool)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < LOGIT_ATOL


def _hf_greedy(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers_generate(llm_fp32, hf_model):
    """5 chat prompts x 64 tokens: batched (5 at once) and one at a time, token for token.

    Both stop at EOS (kept in the output) or after 64 tokens."""
    tok = llm_fp32.get_tokenizer()
    prompts = CHAT_PROMPTS[:5]
    params = SamplingParams(temperature=0.0, max_tokens=64)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    batched = llm_fp32.chat(convs, params)
    single = [llm_fp32.chat(c, params)[0] for c in convs]
    for p, b, s in zip(prompts, batched, single):
        ref = _hf_greedy(hf_model, _chat_ids(tok, p), 64)
        assert b.outputs[0].token_ids == ref, p
        assert s.outputs[0].token_ids == ref, p
    assert llm_fp32.engine.kv.num_used_blocks == 0


def test_batch_invariance_among_eight_others(llm_fp32):
    """The same request alone and among 8 others of different lengths gives the same tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    target = [{"role": "user", "content": "Tell me about the moon."}]
    alone = llm_fp32.chat(target, params)[0].outputs[0].token_ids
    others = [[{"role": "user", "content": p * (1 + i % 3)}] for i, p in enumerate(CHAT_PROMPTS[:8])]
    mixed_params = [SamplingParams(temperature=0.0, max_tokens=8 + 7 * i, ignore_eos=True) for i in range(8)]
    outs = llm_fp32.chat(others[:4] + [target] + others[4:], mixed_params[:4] + [params] + mixed_params[4:])
    assert outs[4].outputs[0].token_ids == alone
