"""Shared fixtures: the embedded default model and tiny random-weight models of each family."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `--dtype auto` times bf16 against fp32 on the CPU and may pick either; greedy-equality tests need
# the same precision on every machine (servers started by the tests inherit this).
os.environ.setdefault("DSPARK_CPU_DTYPE", "float32")
# No background torch.compile of the decode step in engines and servers the tests start (minutes
# of CPU on two cores); tests/engine/test_compiled_step.py compiles on purpose.
os.environ.setdefault("DSPARK_ENFORCE_EAGER", "1")
# Cost tables and converted models the tests make go to a cache of this test session, not the
# user's ~/.cache/dspark (a test server's table must not become the one `dspark serve` loads).
if "DSPARK_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["DSPARK_CACHE_DIR"] = tempfile.mkdtemp(prefix="dspark-test-cache-")

import pytest

from dspark_testing import make_random_drafter, make_tiny_model


@pytest.fixture(scope="session")
def default_tokenizer():
    from dspark_serve.models.loader import gguf_tokenizer, default_model_path
    from pathlib import Path

    return gguf_tokenizer(Path(default_model_path()))


@pytest.fixture(scope="session")
def llm_fp32():
    """The embedded default model in float32, loaded once per test session."""
    from dspark_serve.engine import LLM

    return LLM(dtype="float32", num_threads=2)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, default_tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    make_tiny_model(path, "llama", default_tokenizer, num_hidden_layers=2, hidden_size=32,
                    intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    return str(path)


@pytest.fixture(scope="session")
def tiny_drafter_dir(tmp_path_factory, tiny_llama_dir):
    return make_random_drafter(tiny_llama_dir, tmp_path_factory.mktemp("tiny-drafter"), block_size=7, markov_rank=16)
