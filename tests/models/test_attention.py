"""The portable paged-attention backend against a naive per-sequence reference."""

from __future__ import annotations

import pytest
import torch

from dspark_serve.models.attention import AttentionMetadata, TorchAttentionBackend

BS = 4  # block size


def _reference(q, k_seq, v_seq, ctx, qlen, scale, window):
    """Causal (optionally windowed) attention of a sequence's last `qlen` positions over its
    first `ctx` K/V entries, one head group at a time (GQA by repetition)."""
    h, hkv = q.shape[1], k_seq.shape[1]
    k = k_seq.repeat_interleave(h // hkv, dim=1)
    v = v_seq.repeat_interleave(h // hkv, dim=1)
    out = torch.empty_like(q)
    for r in range(qlen):
        p = ctx - qlen + r
        lo = 0 if window is None else max(0, p - window + 1)
        att = torch.einsum("hd,khd->hk", q[r], k[lo:p + 1]) * scale
        out[r] = torch.einsum("hk,khd->hd", att.softmax(-1), v[lo:p + 1])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens", [
    [1, 1, 1, 1],  # decodes only: one uniform group
    [1, 8, 3, 1],  # decodes and verification blocks: one padded group
    [1, 40, 1, 17, 8, 100, 33],  # prefill chunks among decodes: several groups
    [64],
])
def test_backend_matches_reference(query_lens, window, dtype):
    torch.manual_seed(sum(query_lens))
    h, hkv, d = 6, 2, 16
    ctx = [q + c for q, c in zip(query_lens, torch.randint(0, 30, (len(query_lens),)).tolist())]
    nblocks = sum((c + BS - 1) // BS for c in ctx)
    perm = torch.randperm(nblocks).tolist()  # block tables out of order, as a pool hands them out
    tables, used = [], 0
    for c in ctx:
        n = (c + BS - 1) // BS
        tables.append(perm[used:used + n])
        used += n
    k_cache = torch.zeros(nblocks * BS, hkv, d)
    v_cache = torch.zeros(nblocks * BS, hkv, d)
    full_k = [torch.randn(c, hkv, d) for c in ctx]
    full_v = [torch.randn(c, hkv, d) for c in ctx]
    for t, c, kk, vv in zip(tables, ctx, full_k, full_v):  # the earlier context is already cached
        for p in range(c):
            k_cache[t[p // BS] * BS + p % BS] = kk[p]
            v_cache[t[p // BS] * BS + p % BS] = vv[p]
    q = torch.randn(sum(query_lens), h, d)
    new_k = torch.cat([kk[c - ql:] for kk, c, ql in zip(full_k, ctx, query_lens)])
    new_v = torch.cat([vv[c - ql:] for vv, c, ql in zip(full_v, ctx, query_lens)])
    meta = AttentionMetadata(list(query_lens), ctx, tables, BS)
    scale = d ** -0.5
    got = TorchAttentionBackend().forward(q.to(dtype), new_k.to(dtype), new_v.to(dtype), k_cache.to(dtype),
                                          v_cache.to(dtype), meta, scale, window).float()
    tol = dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    for (g, qq), kk, vv, c, ql in zip(
        zip(torch.split(got, query_lens), torch.split(q, query_lens)), full_k, full_v, ctx, query_lens
    ):
        torch.testing.assert_close(g, _reference(qq, kk, vv, c, ql, scale, window), **tol)


def test_long_queries_are_not_padded_with_decodes():
    """A prefill chunk does not pad the decodes of its step to its length."""
    meta = AttentionMetadata([1] * 6 + [200, 90, 150], [50] * 6 + [200, 300, 150], [[0] * 75] * 9, 4)
    groups = TorchAttentionBackend()._groups(meta)
    assert sorted(g["gather"].shape[0] * g["max_q"] for g in groups) == [6, 90, 400]  # 200 and 150 share a group (within 2x)
