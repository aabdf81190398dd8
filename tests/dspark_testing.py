"""Builders shared by the tests: tiny random-weight models and drafters, prompts.

(A module with a unique name rather than `conftest`, which several test folders have.)
"""

from __future__ import annotations

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
