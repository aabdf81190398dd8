"""Paged attention over a flat batch.

A step's forward runs many sequences at once: their new tokens are
concatenated into one flat list, and each sequence brings a query length (1 for
a decode, k+1 for a verification block, a chunk for prefill), a context length
(tokens in its KV after this step) and a block table into the paged KV pool.

`AttentionMetadata` is built once per step and shared by every layer; the
backend turns it into whatever index tensors it needs (also once per step).
`TorchAttentionBackend` is portable (CPU and CUDA): it writes the new K/V into
their slots, gathers each sequence's context into a padded batch and runs one
SDPA call per group of sequences with similar query lengths, with a boolean mask
carrying causality, padding and sliding windows.

On a CPU with our kernels (models/kernels: AVX-512 or AVX2) and a bf16 or float32 pool, the group of small queries
(decodes, verification blocks, short chunks) and the compiled decode step read the pool
directly instead (`paged_kernel`, ``torch.ops.dspark.paged_attention``): one pass over each
sequence's own context, no gathered copy, no padding to the longest context of the batch.
Gathering 32 contexts of ~1,000 tokens costs ~20 ms per layer on two cores; the kernel reads
the same bytes once (docs/benchmarks/attention.md). Both paths of a step use the kernel, so a
token's attention has the same bits in a decode step, a verification block or a mixed step.
"""

from __future__ import annotations

import os
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
    # Leading flat rows that are prompt tokens: packed (quantized) linears run them through their
    # dense weight, every later row through the packed kernel (models/quant.py).
    dense_rows: int = 0
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


_PAGED: list[bool] = []  # resolved once: whether the paged-attention kernel serves here


def paged_kernel() -> bool:
    """Whether ``torch.ops.dspark.paged_attention`` serves the small-query attention of bf16 and
    float32 pools here (models/kernels builds on AVX-512 and AVX2 CPUs with a C++ compiler).
    ``DSPARK_ATTENTION_KERNEL=torch`` keeps the gather-then-matmul path (the reference)."""
    if not _PAGED:
        ok = False
        if os.environ.get("DSPARK_ATTENTION_KERNEL", "auto") != "torch":
            from dspark_serve.models import kernels

            ok = kernels.paged_attention_available()
        _PAGED.append(ok)
    return _PAGED[0]


KERNEL_DTYPES = (torch.bfloat16, torch.float32)  # the pool dtypes the paged-attention kernel reads


def kernel_serves(dtype: torch.dtype, head_dim: int, device: torch.device | str = "cpu") -> bool:
    """Whether the paged-attention kernel serves a pool of this dtype and head size here."""
    return (torch.device(device).type == "cpu" and dtype in KERNEL_DTYPES and head_dim % 16 == 0
            and head_dim <= 256 and paged_kernel())


def _takes_kernel(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return q.dtype == k_cache.dtype and kernel_serves(k_cache.dtype, q.shape[-1], q.device)


_NONE = {dt: torch.empty(0, dtype=dt) for dt in KERNEL_DTYPES}  # "the pool already holds the new tokens' K/V"


class TorchAttentionBackend:
    """Gather-then-SDPA paged attention; runs wherever PyTorch runs.

    One SDPA call pads every sequence of its batch to the longest query of the batch, so a step
    that mixes a 256-token prefill chunk with 63 decodes would run 64 x 256 query rows. The
    sequences are therefore split into groups of similar query length (all queries of at most
    SMALL_QUERY tokens together: decodes and verification blocks; longer ones by power of two),
    one SDPA call per group, padding at most 2x inside a group of long queries."""

    name = "torch-sdpa"
    SMALL_QUERY = 16

    @classmethod
    def _group_key(cls, q: int) -> int:
        return 0 if q <= cls.SMALL_QUERY else (q - 1).bit_length()

    def _groups(self, meta: AttentionMetadata) -> list[dict]:
        groups = meta._cache.get("groups")
        if groups is not None:
            return groups
        members: dict[int, list[int]] = {}
        for i, q in enumerate(meta.query_lens):
            members.setdefault(self._group_key(q), []).append(i)
        starts = [0]
        for q in meta.query_lens:
            starts.append(starts[-1] + q)
        whole = len(members) == 1
        groups = [self._group_base(meta, ids, starts, whole) for ids in members.values()]
        meta._cache["groups"] = groups
        return groups

    @staticmethod
    def _group_base(meta: AttentionMetadata, ids: list[int], starts: list[int], whole: bool) -> dict:
        """Index tensors of one group: the flat slot of every padded context entry, the query and
        key positions, and where the group's tokens sit in the flat batch (None: all of it)."""
        dev = meta.device
        bs = meta.block_size
        qlist = [meta.query_lens[i] for i in ids]
        qlens = torch.tensor(qlist, dtype=torch.long)
        clens = torch.tensor([meta.context_lens[i] for i in ids], dtype=torch.long)
        nseq = len(ids)
        max_q = int(qlens.max())
        max_ctx = int(clens.max())
        # Flat slot of context entry j of sequence b, for j < max_ctx (clamped to slot 0 for
        # padding; the mask hides it).
        nblk = (max_ctx + bs - 1) // bs
        table = torch.zeros(nseq, nblk, dtype=torch.long)
        for row, i in enumerate(ids):
            t = meta.block_tables[i]
            n = min(len(t), nblk)
            table[row, :n] = torch.tensor(t[:n], dtype=torch.long)
        j = torch.arange(max_ctx)
        gather = table[:, j // bs] * bs + (j % bs)
        qi = torch.arange(max_q)
        uniform = bool((qlens == max_q).all())
        # padded row of each of the group's tokens (None: no padding)
        scatter = None if uniform else torch.cat([torch.arange(q) + b * max_q for b, q in enumerate(qlist)])
        tokens = None if whole else torch.cat([torch.arange(starts[i], starts[i] + meta.query_lens[i]) for i in ids])
        return dict(
            gather=gather.to(dev),
            kpos=j.unsqueeze(0).expand(nseq, -1),
            qpos=(clens - qlens).unsqueeze(1) + qi.unsqueeze(0),  # [nseq, max_q]
            qvalid=qi.unsqueeze(0) < qlens.unsqueeze(1),
            clens=clens,
            qlens=qlens,
            max_q=max_q,
            scatter=None if scatter is None else scatter.to(dev),
            tokens=None if tokens is None else tokens.to(dev),
        )

    @staticmethod
    def _mask(meta: AttentionMetadata, g: dict, gi: int, window: int | None) -> torch.Tensor:
        key = ("mask", gi, window)
        if key in meta._cache:
            return meta._cache[key]
        mask = attention_mask(g["kpos"], g["qpos"], g["clens"], g["qvalid"], window).to(meta.device)
        meta._cache[key] = mask
        return mask

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
        groups = self._groups(meta)
        out = None if len(groups) == 1 else q.new_empty(q.shape)
        for gi, g in enumerate(groups):
            qg = q if g["tokens"] is None else q.index_select(0, g["tokens"])
            if g["max_q"] <= self.SMALL_QUERY and _takes_kernel(q, k_cache):
                res = torch.ops.dspark.paged_attention(qg, k_cache, v_cache, g["gather"], g["clens"], g["qlens"],
                                                       _NONE[q.dtype], _NONE[q.dtype], scale, window or 0)
            else:
                res = self._attend(qg, k_cache, v_cache, g, self._mask(meta, g, gi, window), scale)
            if out is None:
                return res
            out.index_copy_(0, g["tokens"], res)
        return out

    @staticmethod
    def _attend(q, k_cache, v_cache, g: dict, mask: torch.Tensor, scale: float) -> torch.Tensor:
        """SDPA of one group's tokens [n, H, D] over their gathered contexts."""
        gather, max_q, scatter = g["gather"], g["max_q"], g["scatter"]
        nseq = gather.shape[0]
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
        qq, kk, vv = qq.transpose(1, 2), kk.to(q.dtype), vv.to(q.dtype)
        if q.device.type == "cpu" and max_q <= TorchAttentionBackend.SMALL_QUERY:
            out = _small_query_attention(qq, kk, vv, mask, scale)
        else:
            out = F.scaled_dot_product_attention(qq, kk, vv, attn_mask=mask, scale=scale,
                                                 enable_gqa=kk.shape[1] != n_heads)  # [B, H, max_q, D]
        out = out.transpose(1, 2).reshape(nseq * max_q, n_heads, head_dim)
        return out if scatter is None else out[scatter]


def _small_query_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                           scale: float) -> torch.Tensor:
    """Attention of a few queries per sequence as two batched matmuls (q [B, H, Q, D], k/v
    [B, Hkv, C, D], mask [B, 1, Q, C] -> [B, H, Q, D]); query head h reads K/V head h // (H / Hkv).

    On a CPU, PyTorch's SDPA kernel is tiled for long queries: for decodes and verification
    blocks this is several times faster (bf16, [64 seqs, 1 query, 400 keys] on 2 cores: about
    2 vs 11 ms). K/V are made contiguous first: a matmul copies a strided operand more slowly.
    Numerics as transformers' eager attention: scores in the model dtype, softmax in float32."""
    b, h, nq, d = q.shape
    hkv, c = k.shape[1], k.shape[2]
    g = h // hkv
    s = torch.matmul(q.reshape(b, hkv, g * nq, d), k.contiguous().transpose(-1, -2)).view(b, hkv, g, nq, c)
    s = s.float().mul_(scale).masked_fill_(~mask.view(b, 1, 1, nq, c), float("-inf"))
    p = s.softmax(dim=-1).to(v.dtype).view(b, hkv, g * nq, c)
    return torch.matmul(p, v.contiguous()).view(b, h, nq, d)


@dataclass
class DecodeInputs:
    """Index tensors of a step whose every sequence feeds a few generated tokens (decodes and
    verification blocks; no prompt rows): what `LlamaForCausalLM.forward_decode` reads. Built
    with vectorised ops from the step's lists, once per step (`decode_inputs`).

    With S sequences, N flat tokens, Q the longest query and C the longest context:
    gather [S, C] pool slot of every context entry (padding: a valid slot the mask hides),
    scatter [N] each token's row in the padded [S * Q] query batch, overlay [N] each token's
    entry in the flattened [S * C] gathered context (where its new K/V goes), mask
    [S, 1, Q, C], positions and slots [N] (slots: where the new K/V is written after the forward).
    """

    positions: torch.Tensor
    slots: torch.Tensor
    gather: torch.Tensor
    scatter: torch.Tensor
    overlay: torch.Tensor
    mask: torch.Tensor
    query_lens: torch.Tensor  # [S] (the paged-attention kernel reads these two)
    context_lens: torch.Tensor  # [S]

    @property
    def shape_class(self) -> tuple[bool, bool]:
        """(several sequences, several queries per sequence): the sizes a compiled graph
        specialises on (a dimension of 1 is a constant to the compiler)."""
        return self.gather.shape[0] > 1, self.mask.shape[2] > 1


def decode_inputs(query_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                  block_size: int, device: torch.device, with_mask: bool = True) -> DecodeInputs:
    """`DecodeInputs` of one step. The mask, gather and padding are the ones
    `TorchAttentionBackend` builds for a single group of small queries, so the two paths attend
    over the same numbers in the same shapes. `with_mask=False` (where the paged-attention
    kernel attends, which masks by position itself) leaves the mask empty, [S, 1, Q, 0]: a prompt
    chunk's would be [S, 1, longest query, longest context]."""
    paged_kernel()  # resolved here, outside any compiled graph that reads it
    qlens = torch.tensor(query_lens, dtype=torch.long)
    clens = torch.tensor(context_lens, dtype=torch.long)
    nseq, n = len(query_lens), int(qlens.sum())
    max_q, max_ctx = int(qlens.max()), int(clens.max())
    nblk = -(-max_ctx // block_size)
    table = torch.tensor([t[:nblk] + [0] * (nblk - len(t[:nblk])) for t in block_tables], dtype=torch.long)
    seq = torch.repeat_interleave(torch.arange(nseq), qlens)  # [N] each token's sequence
    first = torch.cumsum(qlens, 0) - qlens
    offset = torch.arange(n) - first[seq]  # [N] index of the token within its query
    positions = (clens - qlens)[seq] + offset
    slots = table[seq, positions // block_size] * block_size + positions % block_size
    j = torch.arange(max_ctx)
    gather = table[:, j // block_size] * block_size + j % block_size
    if with_mask:
        qpos = (clens - qlens).unsqueeze(1) + torch.arange(max_q).unsqueeze(0)
        qvalid = torch.arange(max_q).unsqueeze(0) < qlens.unsqueeze(1)
        mask = attention_mask(j.unsqueeze(0).expand(nseq, -1), qpos, clens, qvalid, None)
    else:
        mask = torch.empty(nseq, 1, max_q, 0, dtype=torch.bool)
    return DecodeInputs(
        positions=positions.to(device), slots=slots.to(device), gather=gather.to(device),
        scatter=(seq * max_q + offset).to(device), overlay=(seq * max_ctx + positions).to(device),
        mask=mask.to(device), query_lens=qlens.to(device), context_lens=clens.to(device),
    )


def attention_mask(kpos: torch.Tensor, qpos: torch.Tensor, clens: torch.Tensor, qvalid: torch.Tensor,
                   window: int | None) -> torch.Tensor:
    """[S, 1, Q, C] boolean: query q of sequence s may read context entry c (causal, inside the
    sequence's context and its sliding window); padding query rows read entry 0 (SDPA returns
    NaN for a row that reads nothing)."""
    allowed = (kpos.unsqueeze(1) <= qpos.unsqueeze(2)) & (kpos.unsqueeze(1) < clens.view(-1, 1, 1))
    if window is not None:
        allowed &= kpos.unsqueeze(1) > qpos.unsqueeze(2) - window
    allowed[:, :, 0] |= ~qvalid
    return allowed.unsqueeze(1)


def overlay_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, inputs: DecodeInputs, scale: float) -> torch.Tensor:
    """`TorchAttentionBackend.forward` for a `DecodeInputs` step without writing the pool: the
    context is gathered from the pool and the new tokens' K/V are put into the gathered copy
    (the pool is written once after the forward, for every layer: a graph compiler would
    otherwise copy the whole pool to keep an in-place write functional). Same numbers, same
    shapes, same kernels as the writing path: the same bits. With the paged-attention kernel, the
    new tokens' K/V are handed to it beside the pool (`k_new`), which it reads in their place."""
    if _takes_kernel(q, k_cache):
        return torch.ops.dspark.paged_attention(q, k_cache, v_cache, inputs.gather, inputs.context_lens,
                                                inputs.query_lens, k.to(k_cache.dtype), v.to(v_cache.dtype),
                                                scale, 0)
    nseq, ctx = inputs.gather.shape
    max_q = inputs.mask.shape[2]
    flat = inputs.gather.reshape(-1)
    kk = k_cache.index_select(0, flat).index_copy(0, inputs.overlay, k.to(k_cache.dtype))
    vv = v_cache.index_select(0, flat).index_copy(0, inputs.overlay, v.to(v_cache.dtype))
    kk = kk.view(nseq, ctx, *k_cache.shape[1:]).transpose(1, 2).to(q.dtype)
    vv = vv.view(nseq, ctx, *v_cache.shape[1:]).transpose(1, 2).to(q.dtype)
    n_heads, head_dim = q.shape[1], q.shape[2]
    qq = q.new_zeros(nseq * max_q, n_heads, head_dim).index_copy(0, inputs.scatter, q)
    qq = qq.view(nseq, max_q, n_heads, head_dim).transpose(1, 2)
    out = _small_query_attention(qq, kk, vv, inputs.mask, scale)
    return out.transpose(1, 2).reshape(nseq * max_q, n_heads, head_dim).index_select(0, inputs.scatter)
