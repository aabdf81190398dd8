"""Normalised description of a Llama-family target model.

One dataclass for Llama / SmolLM2, Qwen2 and Qwen3 (and Mistral-style sliding
windows): the model code reads only these fields, never the HF config, so the
differences between families are settled here, once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False  # bias on q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False  # bias on o_proj (Llama attention_bias only)
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k
    # Per layer: None for full attention, else the window size in tokens.
    sliding_windows: list[int | None] = field(default_factory=list)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # The HF config object, kept for RoPE initialisation (all scaling types).
    hf_config: Any = None

    @classmethod
    def from_hf(cls, hf: Any) -> "ModelConfig":
        mt = getattr(hf, "model_type", None)
        if mt not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {mt!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        num_heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // num_heads
        n_layers = hf.num_hidden_layers
        windows: list[int | None] = [None] * n_layers
        layer_types = getattr(hf, "layer_types", None)
        window = getattr(hf, "sliding_window", None)
        if layer_types:
            windows = [window if t == "sliding_attention" else None for t in layer_types]
        elif mt == "mistral" and window:
            windows = [window] * n_layers
        if mt == "qwen2":
            qkv_bias, o_bias = True, False
        else:
            ab = bool(getattr(hf, "attention_bias", False))
            qkv_bias, o_bias = ab, ab and mt != "qwen3"
        eos = getattr(hf, "eos_token_id", None)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            model_type=mt,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=n_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=getattr(hf, "max_position_embeddings", 4096),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(getattr(hf, "mlp_bias", False)),
            qk_norm=mt == "qwen3",
            sliding_windows=windows,
            bos_token_id=getattr(hf, "bos_token_id", None),
            eos_token_ids=eos_ids,
            hf_config=hf,
        )

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of target KV cache one token occupies across all layers."""
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * dtype_bytes
