"""`forward_decode` (the pure decode forward the engine compiles) gives `forward`'s bits."""

from __future__ import annotations

import pytest
import torch

from dspark_serve.models.attention import AttentionMetadata, decode_inputs
from dspark_serve.models.loader import load_model

BS = 4


def _step(query_lens, seed):
    """Contexts, shuffled block tables and tokens of a step whose sequences feed `query_lens` tokens."""
    g = torch.Generator().manual_seed(seed)
    ctx = [q + int(torch.randint(1, 30, (1,), generator=g)) for q in query_lens]
    nblocks = sum(-(-c // BS) for c in ctx) + 3
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables, used = [], 0
    for c in ctx:
        n = -(-c // BS)
        tables.append(perm[used:used + n])
        used += n
    ids = torch.randint(0, 500, (sum(query_lens),), generator=g)
    return ctx, tables, ids, nblocks


@pytest.mark.parametrize("quantization", ["none", "int4"])
@pytest.mark.parametrize("query_lens", [[1], [5], [1, 1, 1], [1, 8, 3, 1], [4, 4]])
def test_forward_decode_bits_equal_forward(tiny_llama_dir, query_lens, quantization):
    model = load_model(tiny_llama_dir, "bfloat16", torch.device("cpu"), quantization=quantization).model
    cfg = model.config
    ctx, tables, ids, nblocks = _step(query_lens, sum(query_lens))
    kv = torch.randn(cfg.num_layers, 2, nblocks * BS, cfg.num_kv_heads, cfg.head_dim,
                     generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    sel = torch.arange(sum(query_lens))
    aux_ids = (-1, 0)

    kv_a = kv.clone()
    meta = AttentionMetadata(list(query_lens), ctx, tables, BS)
    want, want_aux = model(ids, meta.positions(), meta, [(kv_a[i, 0], kv_a[i, 1]) for i in range(cfg.num_layers)],
                           logits_indices=sel, aux_layer_ids=aux_ids)

    inputs = decode_inputs(list(query_lens), ctx, tables, BS, torch.device("cpu"))
    assert torch.equal(inputs.positions, meta.positions()) and torch.equal(inputs.slots, meta.slot_mapping())
    kv_b = kv.clone()
    with torch.inference_mode():
        got, got_aux, new_kv = model.forward_decode(ids, inputs, kv_b, sel, aux_ids)
    assert torch.equal(kv_b, kv), "forward_decode must not write the pool"
    kv_b.index_copy_(2, inputs.slots, new_kv)
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(got_aux, want_aux))
    assert torch.equal(kv_b, kv_a)


def test_decode_inputs_mask_matches_the_backend():
    """The mask and gather are the portable backend's (one group of small queries)."""
    from dspark_serve.models.attention import TorchAttentionBackend

    query_lens = [1, 8, 3, 1]
    ctx, tables, _, _ = _step(query_lens, 3)
    meta = AttentionMetadata(query_lens, ctx, tables, BS)
    backend = TorchAttentionBackend()
    (g,) = backend._groups(meta)
    inputs = decode_inputs(query_lens, ctx, tables, BS, torch.device("cpu"))
    assert torch.equal(inputs.gather, g["gather"])
    assert torch.equal(inputs.mask, backend._mask(meta, g, 0, None))
    assert torch.equal(inputs.scatter, g["scatter"])
    assert inputs.shape_class == (True, True)
