"""DSpark speculative decoding inside the engine step: drafting and lossless verification.

Per step (DESIGN.md steps 2-6): the batcher has reserved up to 1 + cap slots
for each decoding request; `DraftProposer.propose` runs ONE drafter pass for
all of them (backbone over [anchor, mask...], then the sequential head
sampling x1..xg for all requests at once, with confidences); the policy picks
l per request; the target verifies [anchor, x1..xl] in the step's single
forward; `verify` accepts/rejects (greedy or rejection sampling with residual
resampling and the bonus token). The drafter's context pool is written from
the target's hidden states of every fed token, and rolled back together with
the target KV because both are indexed by the same block table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from models.dspark import DSparkDrafter

from .sampler import warp_probs


@dataclass
class SpecConfig:
    method: str = "none"  # "dspark" | "none"
    model: str | None = None  # drafter directory
    num_speculative_tokens: int | None = None  # gamma; default: the drafter's block_size
    verification: str = "fixed"  # fixed | off (the scheduler adds load-aware policies)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "SpecConfig":
        if not d:
            return cls()
        known = {"method", "model", "num_speculative_tokens", "verification"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown speculative_config keys {sorted(unknown)}; known: {sorted(known)}")
        method = d.get("method", "dspark" if d.get("model") else "none")
        if method not in ("dspark", "none"):
            raise ValueError(f"speculative_config method must be 'dspark' or 'none', got {method!r}")
        if method == "dspark" and not d.get("model"):
            raise ValueError("speculative_config method 'dspark' needs a drafter 'model' path")
        n = d.get("num_speculative_tokens")
        if n is not None and (not isinstance(n, int) or n < 1):
            raise ValueError("num_speculative_tokens must be a positive integer")
        return cls(method, d.get("model"), n, d.get("verification", "fixed"))

    @property
    def enabled(self) -> bool:
        return self.method == "dspark"


@dataclass
class Drafts:
    tokens: torch.Tensor  # [R, g] long
    confidences: torch.Tensor  # [R, g] conditional c_k in (0, 1); ones without a confidence head
    probs: torch.Tensor | None  # [R, g, V] warped draft distributions (None rows for greedy requests)


def _params_tensors(params_list, device):
    return (
        torch.tensor([max(p.temperature, 1e-5) for p in params_list], device=device),
        torch.tensor([p.top_k for p in params_list], device=device),
        torch.tensor([p.top_p for p in params_list], device=device),
        torch.tensor([p.min_p for p in params_list], device=device),
    )


def _draw(probs: torch.Tensor, generators: list) -> torch.Tensor:
    """One categorical draw per row with each row's own generator (None: global RNG)."""
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for i, g in enumerate(generators):
        out[i] = torch.multinomial(probs[i], 1, generator=g)[0]
    return out


class DraftProposer:
    def __init__(self, drafter: DSparkDrafter, num_slots: int, dtype: torch.dtype, device: torch.device, gamma: int):
        self.drafter = drafter
        cfg = drafter.config
        self.gamma = gamma
        self.layer_ids = list(cfg.target_layer_ids)
        self.pool = torch.zeros(cfg.num_hidden_layers, 2, num_slots, cfg.num_key_value_heads, cfg.head_dim,
                                dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(drafter: DSparkDrafter, dtype: torch.dtype) -> int:
        c = drafter.config
        return c.num_hidden_layers * 2 * c.num_key_value_heads * c.head_dim * dtype.itemsize

    @torch.inference_mode()
    def write_context(self, aux_hidden: list[torch.Tensor], positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Cache the drafter's context K/V of every fed target position."""
        h_ctx = self.drafter.context_features(aux_hidden)
        for i, (k, v) in enumerate(self.drafter.context_kv(h_ctx, positions)):
            self.pool[i, 0].index_copy_(0, slots, k.to(self.pool.dtype))
            self.pool[i, 1].index_copy_(0, slots, v.to(self.pool.dtype))

    @torch.inference_mode()
    def propose(self, seqs: list, block_size: int, gamma: int) -> Drafts:
        """Draft `gamma` tokens for each sequence (all in pure decode: one pending token, the anchor)."""
        dev = self.pool.device
        r = len(seqs)
        ctx_lens = [s.num_computed_tokens for s in seqs]
        max_ctx = max(ctx_lens)
        j = torch.arange(max_ctx)
        gather = torch.zeros(r, max_ctx, dtype=torch.long)
        for i, s in enumerate(seqs):
            blocks = torch.tensor(s.block_table.blocks, dtype=torch.long)
            n = ctx_lens[i]
            gather[i, :n] = blocks[j[:n] // block_size] * block_size + j[:n] % block_size
        gather = gather.to(dev)
        mask = (j[None, :] < torch.tensor(ctx_lens)[:, None]).to(dev)
        ctx = [(self.pool[i, 0][gather], self.pool[i, 1][gather]) for i in range(self.pool.shape[0])]
        anchors = torch.tensor([s.token_ids[-1] for s in seqs], dtype=torch.long, device=dev)
        anchor_pos = torch.tensor(ctx_lens, dtype=torch.long, device=dev)
        d = self.drafter
        h = d.backbone(anchors, anchor_pos, ctx, mask, gamma)  # [R, g, d]
        base = d.base_logits(h).float()  # [R, g, V]
        greedy = [s.params.greedy for s in seqs]
        stochastic = [i for i, g in enumerate(greedy) if not g]
        warp_args = _params_tensors([seqs[i].params for i in stochastic], dev) if stochastic else None
        gens = [seqs[i].generator for i in stochastic]
        tokens = torch.empty(r, gamma, dtype=torch.long, device=dev)
        conf = torch.ones(r, gamma, device=dev)
        probs = torch.zeros(r, gamma, base.shape[-1], device=dev) if stochastic else None
        prev = anchors
        state = None
        for k in range(gamma):
            logits = base[:, k]
            prev_emb = None
            if d.markov_head is not None:
                prev_emb = d.markov_head.markov_w1(prev)
                bias, state = d.markov_head.step(prev_emb, h[:, k], state)
                logits = logits + bias.float()
            if d.confidence_head is not None:
                conf[:, k] = torch.sigmoid(d.confidence_head(h[:, k], prev_emb).float())
            x = logits.argmax(dim=-1)
            if stochastic:
                p = warp_probs(logits[stochastic], *warp_args)
                probs[stochastic, k] = p
                x[stochastic] = _draw(p, gens)
            tokens[:, k] = x
            prev = x
        return Drafts(tokens, conf, probs)


def verify(
    params,
    target_logits: torch.Tensor,  # [l+1, V] raw target logits for [anchor, x1..xl]
    draft_tokens: list[int],  # x1..xl
    draft_probs: torch.Tensor | None,  # [>=l, V] warped draft distributions (stochastic requests)
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Returns (number of accepted drafts a, the next token): output = x1..xa + [next]."""
    l = len(draft_tokens)
    logits = target_logits.float()
    if params.greedy:
        best = logits.argmax(dim=-1).tolist()
        a = 0
        while a < l and draft_tokens[a] == best[a]:
            a += 1
        return a, best[a]
    n = logits.shape[0]
    dev = logits.device
    p = warp_probs(
        logits,
        torch.full((n,), max(params.temperature, 1e-5), device=dev),
        torch.full((n,), params.top_k, device=dev),
        torch.full((n,), params.top_p, device=dev),
        torch.full((n,), params.min_p, device=dev),
    )
    for k in range(l):
        x = draft_tokens[k]
        q = draft_probs[k]
        px, qx = float(p[k, x]), float(q[x])
        u = float(torch.rand(1, generator=generator, device=dev))
        if qx > 0 and u * qx < px:  # accept with probability min(1, px / qx)
            continue
        residual = (p[k] - q).clamp_min(0)
        if float(residual.sum()) <= 0:
            residual = p[k]
        return k, int(torch.multinomial(residual / residual.sum(), 1, generator=generator)[0])
    return l, int(torch.multinomial(p[l], 1, generator=generator)[0])
