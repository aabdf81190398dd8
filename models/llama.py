"""Llama-family decoder (Llama / SmolLM2, Qwen2, Qwen3, Mistral) over a flat batch.

The forward takes the concatenated new tokens of many sequences, their
positions and an `AttentionMetadata`; it returns logits for the requested rows
and, on request, the residual stream after chosen decoder layers (the DSpark
drafter's context features). q/k/v and gate/up projections are fused into one
matmul each at load time: fewer, larger GEMMs are what a CPU wants.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import quant
from .attention import AttentionMetadata, DecodeInputs, TorchAttentionBackend, overlay_attention
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # one fused kernel; bit-identical to HF's float32 arithmetic
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # HF's arithmetic for half types: normalise in float32, cast back, then scale (the fused
        # float32 kernel gives the same bits as HF's pow / mean / rsqrt, in 3 ops instead of 7).
        return self.weight * F.rms_norm(x.float(), self.weight.shape, None, self.eps).to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position, built once from the HF rope parameters."""

    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on "meta"
            inv_freq, scaling = _rope_inv_freq(cfg)
            t = torch.arange(max_positions, dtype=torch.float32)
            freqs = torch.outer(t, inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * scaling, persistent=False)
        self.register_buffer("sin", emb.sin() * scaling, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and a sign-folded sin for `apply_rope`, [N, 1, D] each (broadcast over heads)."""
        cos = self.cos[positions].to(dtype)
        sin = self.sin[positions].to(dtype)
        half = sin.shape[-1] // 2
        sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def _rope_inv_freq(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    hf = cfg.hf_config
    params = getattr(hf, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"))
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    dim = cfg.head_dim
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return inv_freq, 1.0


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """HF's x*cos + rotate_half(x)*sin with rotate_half(x) = [-x2, x1] written as
    roll(x, D/2) times a sin whose first half is negated (fewer ops per layer).
    x: [N, H, D]; cos/sin: [N, 1, D] from RotaryEmbedding."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.window = cfg.sliding_windows[layer_idx] if cfg.sliding_windows else None
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, cos, sin, k_cache, v_cache, meta, backend):
        q, k, v = self.qkv(x, cos, sin, meta.dense_rows)
        out = backend.forward(q, k, v, k_cache, v_cache, meta, self.scale, self.window)
        return quant.linear(out.reshape(x.shape[0], self.q_size), self.o_proj, meta.dense_rows)

    def forward_decode(self, x, cos, sin, k_cache, v_cache, inputs: DecodeInputs):
        """`forward` for a `DecodeInputs` step; also returns the new K and V (the caller writes
        them to the pool after the model's forward)."""
        q, k, v = self.qkv(x, cos, sin)
        out = overlay_attention(q, k, v, k_cache, v_cache, inputs, self.scale)
        return quant.linear(out.reshape(x.shape[0], self.q_size), self.o_proj), k, v

    def qkv(self, x, cos, sin, dense_rows: int = 0):
        """q [N, H, D], k and v [N, Hkv, D] of the new tokens, rotated."""
        n = x.shape[0]
        qkv = quant.linear(x, self.qkv_proj, dense_rows)
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, self.q_size + self.kv_size:].view(n, nkv, hd)
        if self.q_norm is None:
            # q and k rotated together: one set of RoPE ops per layer
            qk = apply_rope(qkv[:, : self.q_size + self.kv_size].view(n, nh + nkv, hd), cos, sin)
            q, k = qk[:, :nh], qk[:, nh:]
        else:
            q = apply_rope(self.q_norm(qkv[:, : self.q_size].view(n, nh, hd)), cos, sin)
            k = apply_rope(self.k_norm(qkv[:, self.q_size: self.q_size + self.kv_size].view(n, nkv, hd)), cos, sin)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x, dense_rows: int = 0):
        gate_up = quant.linear(x, self.gate_up_proj, dense_rows)
        return quant.linear(F.silu(gate_up[:, : self.inter]) * gate_up[:, self.inter:], self.down_proj, dense_rows)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, k_cache, v_cache, meta, backend):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, k_cache, v_cache, meta, backend)
        return h + self.mlp(self.post_attention_layernorm(h), meta.dense_rows)


def _decode_layer(layer, h, cos, sin, layer_kv, inputs):
    """One decoder layer of `forward_decode`: (its output, the new tokens' [2, N, Hkv, D] K/V)."""
    a, k, v = layer.self_attn.forward_decode(layer.input_layernorm(h), cos, sin, layer_kv[0], layer_kv[1], inputs)
    h = h + a
    return h + layer.mlp(layer.post_attention_layernorm(h)), torch.stack((k, v))


def check_all_loaded(params, loaded: set[str], unknown: list[str], what: str) -> None:
    """A checkpoint must fill every parameter and bring nothing else: either is a clear error."""
    if unknown:
        raise ValueError(f"{what} has unknown tensors (the model does not know them): {sorted(unknown)[:8]}")
    missing = sorted(set(params) - loaded)
    if missing:
        raise ValueError(f"{what} lacks tensors: {missing[:8]}")


# HF checkpoint name -> (our parameter name, shard index within a fused weight).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg, max_positions or cfg.max_position_embeddings)
        self.backend = TorchAttentionBackend()
        self.head_packed: quant.PackedWeight | None = None  # set by `quantize`
        self.quantization = "none"  # what `quantize` applied, for logs and cache keys

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows that sample: through the packed head for up to
        quant.max_rows rows, else the dense one (models/quant.py)."""
        h = self.norm(hidden)
        if not quant.takes_packed(self.head_packed, h.shape[0]):
            return F.linear(h, self.lm_head_weight)
        return self.head_packed.mm(h)

    def linears(self) -> Iterable[tuple[str, nn.Linear]]:
        """The decoder's projections by parameter prefix (what `quantize` packs)."""
        for i, layer in enumerate(self.layers):
            for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
                yield f"layers.{i}.{name}", layer.get_submodule(name)

    def quantize(self, kinds: dict[str, str], dtype: torch.dtype) -> None:
        """Pack the projections and the head: `kinds` maps "layers.i.<proj>" and "head" to int4,
        int8 or none. Call on float32 weights, before the cast to the serving dtype (a Q4_1
        checkpoint's codes are recovered exactly only from its float32 values)."""
        for name, layer in self.linears():
            kind = kinds.get(name, "none")
            if kind != "none":
                quant.pack_linear(layer, kind, dtype)
        kind = kinds.get("head", "none")
        if kind != "none":
            self.head_packed = quant.PackedWeight.quantize(self.lm_head_weight, kind, dtype)
        used = sorted(set(kinds.values()) - {"none"})
        self.quantization = "+".join(used) if used else "none"

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [N]
        positions: torch.Tensor,  # [N]
        meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],  # per layer: [slots, Hkv, D] x2
        logits_indices: torch.Tensor | None = None,
        aux_layer_ids: Iterable[int] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns (logits of rows `logits_indices` (all rows if None), aux hidden states).

        `aux_layer_ids` are 0-based decoder layers whose output (the residual
        stream after that layer) is returned, in the order asked; -1 is the
        embedding output, matching HF's `hidden_states[i + 1]`.
        """
        aux_ids = list(aux_layer_ids)
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, h.dtype)
        aux: dict[int, torch.Tensor] = {}
        if -1 in aux_ids:
            aux[-1] = h
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_caches[i]
            h = layer(h, cos, sin, k_cache, v_cache, meta, self.backend)
            if i in aux_ids:
                aux[i] = h
        if logits_indices is not None:
            h = h[logits_indices]
        logits = self.compute_logits(h)
        return logits, [aux[i] for i in aux_ids]

    def forward_decode(
        self,
        input_ids: torch.Tensor,  # [N]
        inputs: DecodeInputs,
        kv: torch.Tensor,  # the pool, [layers, 2, slots, Hkv, D]; read, never written
        logits_indices: torch.Tensor,
        aux_layer_ids: tuple[int, ...] = (),
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """`forward` for a step of decodes and verification blocks (`DecodeInputs`), as a pure
        function of tensors: what the engine compiles (engine/compiled_step.py). Returns the
        logits of `logits_indices`, the aux hidden states and the new tokens' K/V
        [layers, 2, N, Hkv, D], for the caller to write at `inputs.slots`. The same arithmetic as
        `forward` (tests/models/test_decode_forward.py checks the bits); no sliding windows."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary(inputs.positions, h.dtype)
        states = [h]  # the residual stream after each layer; states[i + 1] is layer i's output
        new_kv = []
        for i, layer in enumerate(self.layers):
            h, new = _decode_layer(layer, h, cos, sin, kv[i], inputs)
            new_kv.append(new)
            states.append(h)
        logits = self.compute_logits(h.index_select(0, logits_indices))
        return logits, [states[i + 1] for i in aux_layer_ids], torch.stack(new_kv)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into this model; unknown or missing tensors are errors."""
        params = dict(self.named_parameters())
        cfg = self.config
        shard_sizes = {
            "qkv_proj": [cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim],
            "gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size],
        }
        loaded: set[str] = set()
        fused_parts: dict[str, set[int]] = {}
        unknown: list[str] = []
        for name, tensor in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            parts = name.split(".")
            target = name
            shard = None
            for hf_name, (ours, idx) in _FUSED.items():
                if hf_name in parts:
                    target = name.replace(hf_name, ours)
                    shard = (ours, idx)
                    break
            if target not in params:
                unknown.append(name)
                continue
            p = params[target]
            with torch.no_grad():
                if shard is None:
                    if p.shape != tensor.shape:
                        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(p.shape)}")
                    p.copy_(tensor)
                    loaded.add(target)
                else:
                    sizes = shard_sizes[shard[0]]
                    start = sum(sizes[: shard[1]])
                    dst = p.narrow(0, start, sizes[shard[1]])
                    if dst.shape != tensor.shape:
                        raise ValueError(f"shape mismatch for {name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dst.shape)}")
                    dst.copy_(tensor)
                    fused_parts.setdefault(target, set()).add(shard[1])
        for target, got in fused_parts.items():
            if len(got) == len(shard_sizes[target.split(".")[-2]]):
                loaded.add(target)
        check_all_loaded(params, loaded, unknown, "checkpoint")
