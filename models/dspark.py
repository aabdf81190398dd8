"""The DSpark drafter: parallel backbone with KV injection + sequential (Markov) head + confidence head.

REFERENCE.md section 2. For a request whose last sampled token (the anchor)
sits at position p, the backbone runs one block of `gamma` tokens,
[anchor, mask, ..., mask] at positions p..p+gamma-1, through N Qwen3-style
layers. Each layer's keys/values are its projections of the cached context
features (target hidden states of positions < p, `fc` + `hidden_norm`)
followed by its projections of the block; the block attends to all of them,
bidirectionally within the block. The sequential stage then samples x1..xg
left to right from softmax(U_k + B_k(x_{k-1})), and the confidence head scores
each position. Embedding and lm_head are the target's, shared, never copied.

Checkpoints use the DeepSpec `Qwen3DSparkModel` format (REFERENCE.md
section 6), so released drafters load and ours can be loaded elsewhere.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import quant

from .llama import RMSNorm, apply_rope, check_all_loaded

MARKOV_HEAD_TYPES = ("vanilla", "gated", "rnn")


def check_context_window(value, override: bool = False) -> None:
    """A drafter context window: a positive integer or None in config.json; as an override
    (serving config, training flag) also 0, which removes the window."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < (0 if override else 1)):
        want = "a non-negative integer (0: the whole context)" if override else "a positive integer or null"
        raise ValueError(f"draft_context_window must be {want}, got {value!r}")


@dataclass
class DSparkConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int  # draft layers
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    block_size: int  # gamma: tokens drafted per round
    mask_token_id: int
    target_layer_ids: list[int]
    num_target_layers: int
    markov_rank: int = 256
    markov_head_type: str = "vanilla"  # vanilla | gated | rnn | none
    enable_markov_head: bool = True
    enable_confidence_head: bool = True
    confidence_head_with_markov: bool = True
    attention_bias: bool = False
    num_anchors: int = 512
    rope_theta: float = 1000000.0
    rope_parameters: dict | None = None
    max_position_embeddings: int = 32768
    # Restricted draft vocabulary (FR-Spec / EAGLE-3 style): the drafter scores only these target
    # token ids, stored as the `d2t` index tensor beside the weights. None: the full vocabulary.
    draft_vocab_size: int | None = None
    # Sliding window over the context: a block attends to the last `draft_context_window` context
    # positions only (None: all of them). Set by measurement for a drafter trained on short
    # contexts, which drafts worse from far-away context it never saw (docs/benchmarks/drafter.md).
    draft_context_window: int | None = None
    extra: dict = field(default_factory=dict)  # every other field of config.json, written back on save

    _OWN = (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "rms_norm_eps", "block_size", "mask_token_id", "target_layer_ids",
        "num_target_layers", "markov_rank", "markov_head_type", "enable_confidence_head",
        "confidence_head_with_markov", "attention_bias", "num_anchors", "max_position_embeddings",
        "draft_vocab_size", "draft_context_window",
    )

    @classmethod
    def from_dict(cls, d: dict) -> "DSparkConfig":
        missing = [k for k in ("hidden_size", "num_hidden_layers", "block_size", "mask_token_id", "target_layer_ids") if k not in d]
        if missing:
            raise ValueError(f"drafter config.json lacks {missing}")
        heads = d["num_attention_heads"]
        rope_params = d.get("rope_parameters") or d.get("rope_scaling")
        theta = d.get("rope_theta") or (rope_params or {}).get("rope_theta") or 1000000.0
        head_type = d.get("markov_head_type", "vanilla")
        rank = d.get("markov_rank", 256)
        window = d.get("draft_context_window")
        check_context_window(window)
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads", heads),
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            vocab_size=d["vocab_size"],
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            block_size=d["block_size"],
            mask_token_id=d["mask_token_id"],
            target_layer_ids=list(d["target_layer_ids"]),
            num_target_layers=d.get("num_target_layers", 0),
            markov_rank=rank,
            markov_head_type=head_type,
            enable_markov_head=bool(rank) and head_type != "none",
            enable_confidence_head=d.get("enable_confidence_head", True),
            confidence_head_with_markov=d.get("confidence_head_with_markov", True),
            attention_bias=d.get("attention_bias", False),
            num_anchors=d.get("num_anchors", 512),
            rope_theta=float(theta),
            rope_parameters=rope_params,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            draft_vocab_size=d.get("draft_vocab_size"),
            draft_context_window=window,
            extra={k: v for k, v in d.items() if k not in cls._OWN},
        )

    def override_context_window(self, value: int | None) -> None:
        """Apply a serving/training override: None keeps the window, 0 removes it, N sets it."""
        check_context_window(value, override=True)
        if value is not None:
            self.draft_context_window = value or None

    def to_dict(self) -> dict:
        d = dict(self.extra)
        for k in self._OWN:
            d[k] = getattr(self, k)
        d["markov_rank"] = self.markov_rank if self.enable_markov_head else 0
        d.setdefault("architectures", ["Qwen3DSparkModel"])
        d.setdefault("model_type", "qwen3")
        for k in ("draft_vocab_size", "draft_context_window"):
            if d[k] is None:
                d.pop(k)
        d["tie_word_embeddings"] = False
        d["rope_theta"] = self.rope_theta
        if self.rope_parameters:
            d["rope_parameters"] = self.rope_parameters
        return d


class DraftAttention(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d = cfg.hidden_size
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5

    def kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (normed, rotated) and values of `x` [N, d] -> [N, Hkv, D] each."""
        n = x.shape[0]
        k = self.k_norm(quant.linear(x, self.k_proj).view(n, self.num_kv_heads, self.head_dim))
        v = quant.linear(x, self.v_proj).view(n, self.num_kv_heads, self.head_dim)
        return apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, ctx_k, ctx_v, ctx_mask):
        """x: [R, g, d] blocks; ctx_mask: [R, C] the context entries each block sees. ctx_k/v are
        either each block's own gathered context [R, C, Hkv, D] (serving) or one context shared
        by all blocks [C, Hkv, D] (training: the blocks of one sequence)."""
        r, g, d = x.shape
        flat = x.reshape(r * g, d)
        q = self.q_norm(quant.linear(flat, self.q_proj).view(r * g, self.num_heads, self.head_dim))
        q = apply_rope(q, cos, sin).view(r, g, self.num_heads, self.head_dim)
        k, v = self.kv(flat, cos, sin)
        if ctx_k.dim() == 3:
            out = shared_context_attention(q, ctx_k, ctx_v, k.view(r, g, self.num_kv_heads, self.head_dim),
                                           v.view(r, g, self.num_kv_heads, self.head_dim), ctx_mask, self.scale)
            return quant.linear(out, self.o_proj)
        k = torch.cat([ctx_k, k.view(r, g, self.num_kv_heads, self.head_dim)], dim=1)
        v = torch.cat([ctx_v, v.view(r, g, self.num_kv_heads, self.head_dim)], dim=1)
        mask = torch.cat([ctx_mask, ctx_mask.new_ones(r, g)], dim=1)  # the block sees itself whole
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            attn_mask=mask[:, None, None, :], scale=self.scale,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return quant.linear(out.transpose(1, 2).reshape(r, g, self.num_heads * self.head_dim), self.o_proj)


def shared_context_attention(q, ctx_k, ctx_v, blk_k, blk_v, cmask, scale):
    """Attention of R blocks over one shared context (masked per block) plus their own block.

    q: [R, g, H, D]; ctx_k/v: [C, Hkv, D]; blk_k/v: [R, g, Hkv, D]; cmask: [R, C].
    One softmax over [context | own block] per query, bidirectional inside the block: what
    `DraftAttention` computes for per-block contexts, without copying the context per block."""
    a, g, h, d = q.shape
    rep = h // ctx_k.shape[1]
    if rep > 1:
        ctx_k, ctx_v = ctx_k.repeat_interleave(rep, 1), ctx_v.repeat_interleave(rep, 1)
        blk_k, blk_v = blk_k.repeat_interleave(rep, 2), blk_v.repeat_interleave(rep, 2)
    s_ctx = torch.einsum("aghd,chd->ahgc", q, ctx_k) * scale  # [R, H, g, C]
    s_ctx = s_ctx.masked_fill(~cmask[:, None, None, :], float("-inf"))
    s_blk = torch.einsum("aghd,akhd->ahgk", q, blk_k) * scale  # [R, H, g, g]
    p = torch.softmax(torch.cat([s_ctx, s_blk], dim=-1), dim=-1)
    c = ctx_k.shape[0]
    out = torch.einsum("ahgc,chd->aghd", p[..., :c], ctx_v) + torch.einsum("ahgk,akhd->aghd", p[..., c:], blk_v)
    return out.reshape(a, g, h * d)


class DraftMLP(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return quant.linear(F.silu(quant.linear(x, self.gate_proj)) * quant.linear(x, self.up_proj), self.down_proj)


class DraftLayer(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DraftAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DraftMLP(cfg)

    def forward(self, h, cos, sin, ctx_k, ctx_v, ctx_mask):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, ctx_k, ctx_v, ctx_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class MarkovHead(nn.Module):
    """B_k: a bias on the draft logits from the previous token (and, for rnn, a running state)."""

    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        r, d, v = cfg.markov_rank, cfg.hidden_size, cfg.vocab_size
        dv = cfg.draft_vocab_size or v  # W1 reads any previous token; W2 writes draft-vocabulary logits
        self.kind = cfg.markov_head_type
        if self.kind not in MARKOV_HEAD_TYPES:
            raise ValueError(f"markov_head_type must be one of {MARKOV_HEAD_TYPES}, got {self.kind!r}")
        self.rank = r
        self.markov_w1 = nn.Embedding(v, r)
        self.markov_w2 = nn.Linear(r, dv, bias=False)
        if self.kind == "gated":
            self.gate_proj = nn.Linear(d + r, r, bias=True)
        if self.kind == "rnn":
            self.joint_proj = nn.Linear(2 * r + d, 3 * r, bias=True)

    def step(self, prev_emb: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None):
        """One position: prev_emb = W1[x_{k-1}] [..., r], h = h_k [..., d] -> (B_k [..., V'], new state)
        (V' the draft vocabulary)."""
        if self.kind == "vanilla":
            return quant.linear(prev_emb, self.markov_w2), state
        if self.kind == "gated":
            gate = torch.sigmoid(self.gate_proj(torch.cat([h, prev_emb], dim=-1)))
            return quant.linear(gate * prev_emb, self.markov_w2), state
        if state is None:
            state = prev_emb.new_zeros(prev_emb.shape)
        g, c, o = self.joint_proj(torch.cat([state, prev_emb, h], dim=-1)).chunk(3, dim=-1)
        sg = torch.sigmoid(g)
        state = sg * state + (1 - sg) * torch.tanh(c)
        return quant.linear(torch.tanh(o), self.markov_w2), state


class ConfidenceHead(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.with_markov = cfg.confidence_head_with_markov and cfg.enable_markov_head
        self.proj = nn.Linear(cfg.hidden_size + (cfg.markov_rank if self.with_markov else 0), 1, bias=True)

    def forward(self, h: torch.Tensor, prev_emb: torch.Tensor | None) -> torch.Tensor:
        """Confidence logit (before the sigmoid) of position k."""
        x = torch.cat([h, prev_emb], dim=-1) if self.with_markov else h
        return self.proj(x).squeeze(-1)


def check_compatible(cfg: DSparkConfig, tc) -> None:
    """A drafter/target mismatch is a start-up error with every problem named."""
    problems = []
    if cfg.hidden_size != tc.hidden_size:
        problems.append(f"hidden size {cfg.hidden_size} vs target {tc.hidden_size}")
    if cfg.vocab_size != tc.vocab_size:
        problems.append(f"vocab size {cfg.vocab_size} vs target {tc.vocab_size}")
    if cfg.head_dim != tc.head_dim:
        problems.append(f"head_dim {cfg.head_dim} vs target {tc.head_dim}")
    bad_ids = [i for i in cfg.target_layer_ids if not -1 <= i < tc.num_layers]
    if bad_ids:
        problems.append(f"target_layer_ids {bad_ids} outside the target's {tc.num_layers} layers")
    if cfg.num_target_layers and cfg.num_target_layers != tc.num_layers:
        problems.append(f"num_target_layers {cfg.num_target_layers} vs target {tc.num_layers}")
    if cfg.draft_vocab_size is not None and not 0 < cfg.draft_vocab_size <= tc.vocab_size:
        problems.append(f"draft_vocab_size {cfg.draft_vocab_size} outside 1..{tc.vocab_size}")
    if not 0 <= cfg.mask_token_id < tc.vocab_size:
        problems.append(f"mask_token_id {cfg.mask_token_id} outside the vocabulary")
    if problems:
        raise ValueError("drafter does not match the target model: " + "; ".join(problems))


class DSparkDrafter(nn.Module):
    def __init__(self, cfg: DSparkConfig):
        super().__init__()
        self.config = cfg
        d = cfg.hidden_size
        m = len(cfg.target_layer_ids)
        self.fc = nn.Linear(m * d, d, bias=False)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.layers = nn.ModuleList(DraftLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps)
        self.markov_head = MarkovHead(cfg) if cfg.enable_markov_head else None
        self.confidence_head = ConfidenceHead(cfg) if cfg.enable_confidence_head else None
        if cfg.draft_vocab_size is not None:  # draft index -> target token id
            self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size, dtype=torch.long))
        else:
            self.d2t = None
        # The target's embedding, lm_head and RoPE tables, attached (not owned) by `attach_target`.
        object.__setattr__(self, "_embed", None)
        object.__setattr__(self, "_lm_head_weight", None)
        object.__setattr__(self, "_draft_head", None)
        object.__setattr__(self, "_draft_head_packed", None)  # a packed copy when the target's head is packed
        object.__setattr__(self, "_head_kind", None)
        object.__setattr__(self, "rotary", None)

    # ---------------------------------------------------------------- wiring

    def attach_target(self, target) -> None:
        """Share the target's embedding, lm_head and RoPE tables; check that the pair fits."""
        check_compatible(self.config, target.config)
        # Plain attributes, not submodules: the target owns them (no copy, no second state_dict entry).
        object.__setattr__(self, "_embed", target.embed_tokens)
        object.__setattr__(self, "_lm_head_weight", target.lm_head_weight)
        head = getattr(target, "head_packed", None)
        object.__setattr__(self, "_head_kind", head.kind if head is not None else None)
        self.refresh_draft_head()
        # DeepSpec drafters copy the target's config, RoPE included: share its tables.
        object.__setattr__(self, "rotary", target.rotary)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._embed(ids)

    def refresh_draft_head(self) -> None:
        """The lm_head rows of the draft vocabulary (a gathered view of the target's head: the
        only extra memory of a restricted vocabulary, V' x d)."""
        w = self._lm_head_weight
        if w is None:
            return
        if self.d2t is not None:
            if int(self.d2t.min()) < 0 or int(self.d2t.max()) >= w.shape[0]:
                raise ValueError("drafter d2t holds token ids outside the target's vocabulary")
            w = w.detach()[self.d2t.to(w.device)]
        object.__setattr__(self, "_draft_head", w)
        packed = None
        if self._head_kind is not None and w.device.type == "cpu":
            packed = quant.PackedWeight.quantize(w, self._head_kind, w.dtype)
        object.__setattr__(self, "_draft_head_packed", packed)

    def pack_linears(self, dtype: torch.dtype) -> int:
        """Serving on a CPU beside a packed target: the drafter's linears (context projection, its
        layers, the Markov head's W2) get an int8 copy (Q8_0 blocks) read by our VNNI kernel for
        few rows (models/quant.py; drafts only steer speed, verification keeps the output exact).
        Returns how many were packed (0 where the kernel is not available)."""
        if not quant.kernel_serves(dtype):
            return 0
        linears = [self.fc] + [m for layer in self.layers for m in layer.modules() if isinstance(m, nn.Linear)]
        if self.markov_head is not None:
            linears.append(self.markov_head.markov_w2)
        n = 0
        for layer in linears:
            w = layer.weight
            if w.device.type == "cpu" and w.shape[0] % quant.VNNI_BLOCK == 0 and w.shape[1] % quant.INT4_GROUP == 0:
                quant.pack_linear(layer, "int8", dtype)
                n += 1
        return n

    @property
    def target_vocab_size(self) -> int:
        """V, the target's vocabulary (draft distributions are scattered into it for verification)."""
        return self._lm_head_weight.shape[0]

    @property
    def draft_head_weight(self) -> torch.Tensor:
        """The dense lm_head rows of the draft vocabulary [V', d] (training reads it as a parameter-free
        projection)."""
        return self._draft_head

    def base_logits(self, h: torch.Tensor) -> torch.Tensor:
        """U = lm_head(h) over the draft vocabulary [..., V']: through the packed head (the target's
        format) for few rows, where it reads fewer bytes, else the dense one."""
        packed = self._draft_head_packed
        rows = h.numel() // h.shape[-1]
        if not quant.takes_packed(packed, rows):
            return F.linear(h, self._draft_head)
        return packed.mm(h.reshape(rows, h.shape[-1])).view(*h.shape[:-1], -1)

    def to_target_ids(self, idx: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return idx if self.d2t is None else self.d2t[idx]

    # ---------------------------------------------------------------- compute

    def context_features(self, aux_hidden: list[torch.Tensor]) -> torch.Tensor:
        """H_ctx = hidden_norm(fc([H(l1); ...; H(lm)])) for target positions [N, d]."""
        return self.hidden_norm(quant.linear(torch.cat(aux_hidden, dim=-1), self.fc))

    def context_kv(self, h_ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per draft layer, the K/V of context positions (what the drafter's pool caches)."""
        cos, sin = self.rotary(positions, h_ctx.dtype)
        return [layer.self_attn.kv(h_ctx, cos, sin) for layer in self.layers]

    def backbone(
        self,
        anchors: torch.Tensor,  # [R] token ids
        anchor_pos: torch.Tensor,  # [R] positions
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer [R, C, Hkv, D]
        ctx_mask: torch.Tensor,  # [R, C] bool
        gamma: int | None = None,
    ) -> torch.Tensor:
        """The block's hidden states h_1..h_gamma after the final norm: [R, gamma, d]."""
        g = gamma or self.config.block_size
        r = anchors.shape[0]
        ids = torch.full((r, g), self.config.mask_token_id, dtype=torch.long, device=anchors.device)
        ids[:, 0] = anchors
        h = self.embed(ids)
        pos = anchor_pos[:, None] + torch.arange(g, device=anchors.device)[None, :]
        cos, sin = self.rotary(pos.reshape(-1), h.dtype)
        for layer, (ck, cv) in zip(self.layers, ctx_kv):
            h = layer(h, cos, sin, ck, cv, ctx_mask)
        return self.norm(h)

    def sequential_step(self, prev: torch.Tensor, h: torch.Tensor, state: torch.Tensor | None):
        """One position k of the sequential stage: prev = x_{k-1} (target ids) [R], h = h_k [R, d] ->
        (Markov bias B_k [R, V'] or None, confidence logit of c_k [R] or None, the head's new state)."""
        prev_emb, bias, conf = None, None, None
        if self.markov_head is not None:
            prev_emb = self.markov_head.markov_w1(prev)
            bias, state = self.markov_head.step(prev_emb, h, state)
        if self.confidence_head is not None:
            conf = self.confidence_head(h, prev_emb)
        return bias, conf, state

    def teacher_forced(self, h: torch.Tensor, prev: torch.Tensor):
        """The sequential stage with the true previous tokens (training): h [A, g, d], prev [A, g]
        (x_{k-1} of each position) -> (draft logits U + B [A, g, V'], confidence logits [A, g] or
        None). The same heads `sequential_step` runs one position at a time while drafting."""
        prev_emb = None
        if self.markov_head is None:
            logits = self.base_logits(h)
        elif self.markov_head.kind == "vanilla":
            # U + B in one BLAS call: addmm(B, h, lm_head^T); no weight gradient for the frozen head
            prev_emb = self.markov_head.markov_w1(prev)
            bias = self.markov_head.markov_w2(prev_emb)
            a, g = h.shape[:2]
            logits = torch.addmm(bias.reshape(a * g, -1), h.reshape(a * g, -1), self.draft_head_weight.t()).view(a, g, -1)
        else:
            prev_emb = self.markov_head.markov_w1(prev)
            state, biases = None, []
            for k in range(h.shape[1]):
                b, state = self.markov_head.step(prev_emb[:, k], h[:, k], state)
                biases.append(b)
            logits = self.base_logits(h) + torch.stack(biases, dim=1)
        conf = self.confidence_head(h, prev_emb) if self.confidence_head is not None else None
        return logits, conf

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], target=None) -> None:
        """DeepSpec tensor names in; copies of the target's embedding / lm_head are skipped
        (checked against the target when given). Unknown or missing tensors are errors."""
        params = dict(self.named_parameters())
        if self.d2t is not None:
            params["d2t"] = self.d2t
        loaded, unknown = set(), []
        for name, t in weights:
            if name.startswith("model."):
                name = name[len("model."):]
            if name in ("embed_tokens.weight", "lm_head.weight"):
                if target is not None:
                    ref = target.embed_tokens.weight if name == "embed_tokens.weight" else target.lm_head_weight
                    if tuple(ref.shape) != tuple(t.shape):
                        raise ValueError(f"drafter {name} has shape {tuple(t.shape)}, target's is {tuple(ref.shape)}")
                continue  # shared with the target, never duplicated
            if name not in params:
                unknown.append(name)
                continue
            p = params[name]
            if name == "d2t" and p.dtype != t.dtype:
                t = t.to(p.dtype)
            if tuple(p.shape) != tuple(t.shape):
                raise ValueError(f"shape mismatch for drafter tensor {name}: checkpoint {tuple(t.shape)} vs model {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(t)
            loaded.add(name)
        check_all_loaded(params, loaded, unknown, "drafter checkpoint")


def load_drafter(path: str | Path, target=None, dtype: torch.dtype | None = None, device="cpu") -> DSparkDrafter:
    """Load a DeepSpec-format drafter directory (config.json + model.safetensors)."""
    from safetensors import safe_open

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"no config.json in drafter directory {path}")
    try:
        cfg = DSparkConfig.from_dict(json.loads(cfg_file.read_text()))
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_file} is not valid JSON: {e}") from None
    if target is not None:
        check_compatible(cfg, target.config)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in drafter directory {path}")
    with torch.device("meta"):
        drafter = DSparkDrafter(cfg)
    drafter = drafter.to_empty(device="cpu")

    def tensors():
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    yield k, sf.get_tensor(k)

    drafter.load_weights(tensors(), target)
    drafter = drafter.to(device=device, dtype=dtype or torch.float32).eval()  # d2t stays an integer index
    if target is not None:
        drafter.attach_target(target)
    return drafter


def save_drafter(drafter: DSparkDrafter, path: str | Path, include_shared: bool = False,
                 dtype: torch.dtype | None = None) -> None:
    """Write config.json + model.safetensors in the DeepSpec format.

    `include_shared` also writes the target's embedding and lm_head (as released
    DeepSpec checkpoints do); by default they are left out to keep files small."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(drafter.config.to_dict(), indent=2) + "\n")
    def cast(t: torch.Tensor) -> torch.Tensor:  # `dtype` applies to weights, never to the d2t index
        t = t.detach().cpu()
        return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

    sd = {k: cast(v) for k, v in drafter.state_dict().items()}
    if include_shared:
        sd["embed_tokens.weight"] = cast(drafter._embed.weight)
        sd["lm_head.weight"] = cast(drafter._lm_head_weight.clone())
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})


def random_drafter_config(target_cfg, num_layers: int = 1, block_size: int = 7, target_layer_ids=None,
                          markov_rank: int = 64, markov_head_type: str = "vanilla", mask_token_id: int | None = None,
                          **overrides) -> DSparkConfig:
    """A drafter config shaped for `target_cfg` (a models.ModelConfig), for tests and training."""
    n = target_cfg.num_layers
    if target_layer_ids is not None:
        ids = list(target_layer_ids)
    elif n > 3:  # spread over the depth, never the last layer (its output feeds the final norm)
        ids = sorted({max(1, n // 8), n // 3, (2 * n) // 3, n - 2})
    else:
        ids = list(range(n - 1)) or [-1]
    d = dict(
        hidden_size=target_cfg.hidden_size, intermediate_size=target_cfg.intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=target_cfg.num_heads,
        num_key_value_heads=target_cfg.num_kv_heads, head_dim=target_cfg.head_dim,
        vocab_size=target_cfg.vocab_size, rms_norm_eps=target_cfg.rms_norm_eps, block_size=block_size,
        mask_token_id=mask_token_id if mask_token_id is not None else target_cfg.vocab_size - 1,
        target_layer_ids=list(ids), num_target_layers=n, markov_rank=markov_rank,
        markov_head_type=markov_head_type, enable_confidence_head=True, confidence_head_with_markov=True,
        max_position_embeddings=target_cfg.max_position_embeddings,
    )
    d.update(overrides)
    return DSparkConfig.from_dict(d)
