"""Paged attention over a flat batch.

A step's forward runs many sequences at once: their new tokens are
concatenated into one flat list, and each sequence brings a query length (1 for
a decode, k+1 for a verification block, a chunk for prefill), a context length
(tokens in its KV after this step) and a block table into the paged KV pool.

`AttentionMetadata` is built once per step and shared by every layer; the
backend turns it into whatever index tensors it needs (also once per step).
`TorchAttentionBackend` is portable (CPU and CUDA): it writes the new K/V into
their slots, gathers each sequence's context into a padded batch and runs one
SDPA call with a boolean mask carrying causality, padding and sliding windows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    query_lens: list[int]  # new tokens per sequence, in flat-batch order
    context_lens: list[int]  # KV entries per sequence after this step (includes the new tokens)
    block_tables: list[list[int]]  # per sequence: block ids covering context_lens
    block_size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Filled lazily by the backend; shared by all layers of one forward.
    _cache: dict = field(default_factory=dict, repr=False)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def positions(self) -> torch.Tensor:
        """Absolute position of every flat token (its index in its sequence)."""
        pos: list[int] = []
        for q, c in zip(self.query_lens, self.context_lens):
            pos.extend(range(c - q, c))
        return torch.tensor(pos, dtype=torch.long, device=self.device)

    def slot_mapping(self) -> torch.Tensor:
        """Flat KV-pool slot of every new token."""
        if "slots" not in self._cache:
            bs = self.block_size
            slots: list[int] = []
            for q, c, table in zip(self.query_lens, self.context_lens, self.block_tables):
                for p in range(c - q, c):
                    slots.append(table[p // bs] * bs + p % bs)
            self._cache["slots"] = torch.tensor(slots, dtype=torch.long, device=self.device)
        return self._cache["slots"]


class TorchAttentionBackend:
    """Gather-then-SDPA paged attention; runs wherever PyTorch runs."""

    name = "torch-sdpa"

    def _prepare(self, meta: AttentionMetadata, window: int | None):
        key = ("prep", window)
        if key in meta._cache:
            return meta._cache[key]
        dev = meta.device
        bs = meta.block_size
        qlens = torch.tensor(meta.query_lens, dtype=torch.long)
        clens = torch.tensor(meta.context_lens, dtype=torch.long)
        nseq = len(meta.query_lens)
        max_q = int(qlens.max())
        max_ctx = int(clens.max())
        base = meta._cache.get("base")
        if base is None:
            # Flat slot of context entry j of sequence b, for j < max_ctx (clamped
            # to slot 0 for padding; the mask hides it).
            nblk = (max_ctx + bs - 1) // bs
            table = torch.zeros(nseq, nblk, dtype=torch.long)
            for i, t in enumerate(meta.block_tables):
                n = min(len(t), nblk)
                table[i, :n] = torch.tensor(t[:n], dtype=torch.long)
            j = torch.arange(max_ctx)
            gather = table[:, j // bs] * bs + (j % bs)
            kpos = j.unsqueeze(0).expand(nseq, -1)
            qi = torch.arange(max_q)
            qpos = (clens - qlens).unsqueeze(1) + qi.unsqueeze(0)  # [nseq, max_q]
            qvalid = qi.unsqueeze(0) < qlens.unsqueeze(1)
            uniform = bool((qlens == max_q).all())
            if uniform:
                scatter = None
            else:
                scatter = torch.cat(
                    [torch.arange(q) + b * max_q for b, q in enumerate(meta.query_lens)]
                )
            base = dict(
                gather=gather.to(dev),
                kpos=kpos,
                qpos=qpos,
                qvalid=qvalid,
                clens=clens,
                max_q=max_q,
                scatter=None if scatter is None else scatter.to(dev),
            )
            meta._cache["base"] = base
        kpos, qpos = base["kpos"], base["qpos"]
        allowed = (kpos.unsqueeze(1) <= qpos.unsqueeze(2)) & (
            kpos.unsqueeze(1) < base["clens"].view(-1, 1, 1)
        )
        if window is not None:
            allowed &= kpos.unsqueeze(1) > qpos.unsqueeze(2) - window
        # Padding query rows must see something, or SDPA returns NaN for them.
        allowed[:, :, 0] |= ~base["qvalid"]
        prep = (base["gather"], allowed.unsqueeze(1).to(dev), base["max_q"], base["scatter"])
        meta._cache[key] = prep
        return prep

    def forward(
        self,
        q: torch.Tensor,  # [N, H, D]
        k: torch.Tensor,  # [N, Hkv, D]
        v: torch.Tensor,  # [N, Hkv, D]
        k_cache: torch.Tensor,  # [num_slots, Hkv, D]
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        window: int | None = None,
    ) -> torch.Tensor:
        slots = meta.slot_mapping()
        k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
        v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
        gather, mask, max_q, scatter = self._prepare(meta, window)
        nseq = meta.num_seqs
        n_heads, head_dim = q.shape[1], q.shape[2]
        # index_select with a flat index: about 5x faster on CPU than k_cache[gather] with a 2-D index
        flat = gather.reshape(-1)
        kk = k_cache.index_select(0, flat).view(*gather.shape, *k_cache.shape[1:]).transpose(1, 2)  # [B, Hkv, ctx, D]
        vv = v_cache.index_select(0, flat).view(*gather.shape, *v_cache.shape[1:]).transpose(1, 2)
        if scatter is None:
            qq = q.view(nseq, max_q, n_heads, head_dim)
        else:
            qq = q.new_zeros(nseq * max_q, n_heads, head_dim)
            qq[scatter] = q
            qq = qq.view(nseq, max_q, n_heads, head_dim)
        out = F.scaled_dot_product_attention(
            qq.transpose(1, 2),
            kk.to(q.dtype),
            vv.to(q.dtype),
            attn_mask=mask,
            scale=scale,
            enable_gqa=kk.shape[1] != n_heads,
        )  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(nseq * max_q, n_heads, head_dim)
        if scatter is not None:
            out = out[scatter]
        return out
