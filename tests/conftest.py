"""Shared fixtures: the embedded default model and tiny random-weight models of each family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

CHAT_PROMPTS = [
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain gravity to a child.",
    "List three fruits and their colours.",
    "How do I reverse a list in Python?",
    "Give me a synonym for happy.",
    "What is 17 times 23?",
    "Describe a sunset in one sentence.",
    "Name a famous physicist.",
    "Translate 'good morning' into French.",
]


@pytest.fixture(scope="session")
def default_tokenizer():
    from models.loader import _gguf_tokenizer, default_model_path
    from pathlib import Path

    return _gguf_tokenizer(Path(default_model_path()))


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model in float32, loaded once per test session."""
    from engine import LLM

    return LLM(dtype="float32", num_threads=2)


def make_tiny_model(path, model_type: str = "llama", tokenizer=None, shard: bool = False, **overrides):
    """Save a random-weight HF model of `model_type` (and a tokenizer) to `path`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    kw = dict(
        vocab_size=tokenizer.vocab_size if tokenizer is not None else 512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=model_type == "llama",
        eos_token_id=2,
        bos_token_id=1,
    )
    if model_type == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    # Random norms and biases, so the test sees a wrong pairing of weights.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(str(path), max_shard_size="200KB" if shard else "10GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", default_tokenizer, num_hidden_layers=2, hidden_size=32,
                    intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    return str(path)


def make_random_drafter(target_dir_or_model, path, seed: int = 0, **kw):
    """Save a random-weight DSpark drafter (DeepSpec format) shaped for a target."""
    from models.dspark import DSparkDrafter, random_drafter_config, save_drafter
    from models.loader import load_model

    target = target_dir_or_model
    if isinstance(target, str):
        target = load_model(target, dtype="float32").model
    torch.manual_seed(seed)
    cfg = random_drafter_config(target.config, **kw)
    drafter = DSparkDrafter(cfg)
    drafter.attach_target(target)
    save_drafter(drafter, path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_drafter_dir(tmp_path_factory, tiny_llama_dir):
    return make_random_drafter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-drafter"), block_size=7, markov_rank=16)
