"""``torch.ops.dspark.paged_attention`` (models/kernels/paged_attention.cpp): the small-query
attention of bf16 and float32 pools, read straight from the paged pool (the AVX-512 or the AVX2
build, whichever this CPU takes). Against a float32 reference, and the
property the exactness of speculation rests on: a token's attention has the same bits whatever
else is in the step (other sequences, the other queries of its verification block)."""

from __future__ import annotations

import pytest
import torch

import dspark_serve.models.attention as A
from dspark_serve.models import kernels
from dspark_serve.models.attention import AttentionMetadata, TorchAttentionBackend, decode_inputs, overlay_attention

pytestmark = pytest.mark.skipif(not kernels.paged_attention_available(),
                                reason=f"paged attention kernel unavailable (kernels: "
                                       f"{kernels.unavailable_reason() or kernels.isa()})")

BS = 16
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _kernel_on():
    saved = list(A._PAGED)
    A._PAGED[:] = [True]
    yield
    A._PAGED[:] = saved


TOL = {torch.bfloat16: 2e-2, torch.float32: 1e-5}


def _pool(ctx, hkv, d, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-c // BS) for c in ctx]
    perm = torch.randperm(sum(nblk) + 3, generator=g).tolist()  # out of order, as the pool hands blocks out
    tables, used = [], 0
    for n in nblk:
        tables.append(perm[used:used + n])
        used += n
    slots = (sum(nblk) + 3) * BS
    kc = torch.randn(slots, hkv, d, generator=g).to(dtype)
    vc = torch.randn(slots, hkv, d, generator=g).to(dtype)
    return tables, kc, vc


def _step(query_lens, ctx, heads, seed, dtype=torch.bfloat16):
    """A pool holding the contexts, and the step's q and new K/V."""
    h, hkv, d = heads
    tables, kc, vc = _pool(ctx, hkv, d, seed=seed, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    n = sum(query_lens)
    q, k, v = (torch.randn(n, x, d, generator=g).to(dtype) for x in (h, hkv, hkv))
    return tables, kc, vc, q, k, v


def _reference(q, kc, vc, table, c, ql, scale, window=None):
    """Float32 causal attention of one sequence's last `ql` positions over its pool entries."""
    h, hkv = q.shape[1], kc.shape[1]
    slots = torch.tensor([table[p // BS] * BS + p % BS for p in range(c)])
    k = kc[slots].float().repeat_interleave(h // hkv, 1)
    v = vc[slots].float().repeat_interleave(h // hkv, 1)
    out = torch.empty(ql, h, q.shape[2])
    for r in range(ql):
        p = c - ql + r
        lo = 0 if window is None else max(0, p - window + 1)
        att = torch.einsum("hd,khd->hk", q[r].float(), k[lo:p + 1]) * scale
        out[r] = torch.einsum("hk,khd->hd", att.softmax(-1), v[lo:p + 1])
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 8, 128), (4, 1, 16)])
@pytest.mark.parametrize("query_lens, ctx", [
    ([1], [1]),
    ([1, 1, 1], [5, 300, 17]),
    ([8, 1, 3], [8, 700, 33]),  # a block that is the whole context, a decode, a verification block
    ([1] * 12, [1000 - 37 * i for i in range(12)]),
])
def test_overlay_path_matches_a_float_reference(heads, query_lens, ctx, dtype):
    tables, kc, vc, q, k, v = _step(query_lens, ctx, heads, seed=sum(ctx), dtype=dtype)
    scale = heads[2] ** -0.5
    out = overlay_attention(q, k, v, kc, vc, decode_inputs(query_lens, ctx, tables, BS, CPU), scale)
    # the reference reads the new tokens from the pool: write them where the step would
    kw, vw = kc.clone(), vc.clone()
    i = 0
    for t, c, ql in zip(tables, ctx, query_lens):
        for p in range(c - ql, c):
            kw[t[p // BS] * BS + p % BS], vw[t[p // BS] * BS + p % BS] = k[i], v[i]
            i += 1
    assert out.dtype == dtype
    i = 0
    for t, c, ql in zip(tables, ctx, query_lens):
        torch.testing.assert_close(out[i:i + ql].float(), _reference(q[i:i + ql], kw, vw, t, c, ql, scale),
                                   atol=TOL[dtype], rtol=TOL[dtype])
        i += ql


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("window", [None, 7])
def test_writing_path_with_windows_matches_the_reference_and_the_overlay_path(window, dtype):
    """The eager backend (writes the pool, then reads it) and the compiled step's overlay path
    (new K/V beside the pool) give the same bits."""
    query_lens, ctx = [1, 4, 1, 16], [40, 90, 3, 200]
    tables, kc, vc, q, k, v = _step(query_lens, ctx, (6, 2, 64), seed=3, dtype=dtype)
    kw, vw = kc.clone(), vc.clone()
    meta = AttentionMetadata(query_lens, ctx, tables, BS)
    written = TorchAttentionBackend().forward(q, k, v, kw, vw, meta, 0.125, window)
    i = 0
    for t, c, ql in zip(tables, ctx, query_lens):
        torch.testing.assert_close(written[i:i + ql].float(), _reference(q[i:i + ql], kw, vw, t, c, ql, 0.125, window),
                                   atol=TOL[dtype], rtol=TOL[dtype])
        i += ql
    if window is None:
        overlay = overlay_attention(q, k, v, kc, vc, decode_inputs(query_lens, ctx, tables, BS, CPU), 0.125)
        assert torch.equal(written, overlay)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_tokens_bits_do_not_depend_on_the_rest_of_the_step(dtype):
    """Batch invariance: each sequence alone gives the bits it gets among others, and the last
    query of a verification block gives the bits of the same token decoded on its own (its block's
    earlier tokens already in the pool): what keeps greedy speculation token-identical."""
    query_lens, ctx = [1, 5, 1, 3], [260, 64, 999, 17]
    tables, kc, vc, q, k, v = _step(query_lens, ctx, (9, 3, 64), seed=5, dtype=dtype)
    together = overlay_attention(q, k, v, kc, vc, decode_inputs(query_lens, ctx, tables, BS, CPU), 0.125)
    i = 0
    for t, c, ql in zip(tables, ctx, query_lens):
        alone = overlay_attention(q[i:i + ql], k[i:i + ql], v[i:i + ql], kc, vc, decode_inputs([ql], [c], [t], BS, CPU), 0.125)
        assert torch.equal(alone, together[i:i + ql])
        if ql > 1:  # the block's earlier tokens written, its last one decoded alone
            kw, vw = kc.clone(), vc.clone()
            for r, p in enumerate(range(c - ql, c - 1)):
                kw[t[p // BS] * BS + p % BS], vw[t[p // BS] * BS + p % BS] = k[i + r], v[i + r]
            last = i + ql - 1
            single = overlay_attention(q[last:last + 1], k[last:last + 1], v[last:last + 1], kw, vw,
                                       decode_inputs([1], [c], [t], BS, CPU), 0.125)
            assert torch.equal(single, together[last:last + 1])
        i += ql


def test_bad_inputs_are_refused_not_read_out_of_bounds():
    tables, kc, vc = _pool([20], 2, 64, seed=1)
    inputs = decode_inputs([1], [20], tables, BS, CPU)
    q = torch.zeros(1, 4, 64, dtype=torch.bfloat16)
    none = torch.empty(0, dtype=torch.bfloat16)
    bad = inputs.gather.clone()
    bad[0, 3] = kc.shape[0] + 5
    with pytest.raises(RuntimeError, match="slot out of range"):
        torch.ops.dspark.paged_attention(q, kc, vc, bad, inputs.context_lens, inputs.query_lens, none, none, 0.1, 0)
    with pytest.raises(RuntimeError, match="lengths out of range"):
        torch.ops.dspark.paged_attention(q, kc, vc, inputs.gather, inputs.context_lens + 100, inputs.query_lens,
                                         none, none, 0.1, 0)
    with pytest.raises(RuntimeError, match="all bfloat16 or all float32"):  # a mixed-dtype call
        torch.ops.dspark.paged_attention(q.float(), kc, vc, inputs.gather, inputs.context_lens, inputs.query_lens,
                                         none, none, 0.1, 0)


def test_the_float32_kernel_is_exact_enough_to_stand_for_the_torch_path():
    """Float32 pools take the kernel too (the packed float32 that --dtype auto serves on AVX2 CPUs):
    within a few float32 ulps of the gather-then-matmul path it replaces, for decodes and
    verification blocks, the tail of a context that is not a multiple of the vector width included."""
    query_lens, ctx = [1, 8, 1, 3], [7, 45, 1003, 130]
    tables, kc, vc, q, k, v = _step(query_lens, ctx, (9, 3, 64), seed=11, dtype=torch.float32)
    inputs = decode_inputs(query_lens, ctx, tables, BS, CPU)
    kernel = overlay_attention(q, k, v, kc, vc, inputs, 0.125)
    A._PAGED[:] = [False]
    torch_path = overlay_attention(q, k, v, kc, vc, inputs, 0.125)
    torch.testing.assert_close(kernel, torch_path, atol=2e-6, rtol=1e-5)
