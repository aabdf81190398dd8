"""Weight-only quantized linears for the CPU: 4-bit and 8-bit packed weights read by torch's kernels.

A decode step on a CPU is bound by the bytes of weights it reads. Dequantizing a GGUF to bf16 reads
about 3.2x the bytes of its Q4_1 blocks; these linears keep the checkpoint's precision instead:

- ``int4``: 4-bit codes in groups of 32 along the input dimension, each group with a scale and a
  zero point, w = (q - 8) * scale + zero (the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu``).
  GGUF's Q4_1 (w = d * q + m) maps onto it exactly: the group's minimum is m (its code 0) and its
  maximum m + 15 d (code 15), so the asymmetric min/max quantizer below recovers every code and
  both constants to float32 rounding. Other formats (Q4_0, K-quants, float checkpoints) are
  quantized at load with the same rule.
- ``int8``: 8-bit codes with one scale per output channel, w = q * scale
  (``torch.ops.aten._weight_int8pack_mm``). A Q8_0 tensor (a scale per 32 weights) is re-quantized
  per channel at load: close to the checkpoint, not equal to it.

Why torch's own kernels: torchao's x86 wheel (0.18) ships CUDA kernels only and routes CPU int4
through the same aten operator, so it adds nothing here (docs/benchmarks/quantization.md).

The kernels are batch-invariant: a row's result does not depend on the other rows of the call
(tests/models/test_quant.py checks it). They are fastest for few rows (a decode step reads the
weights once); with many rows (prefill chunks) a dense GEMM is faster. A target linear therefore
keeps its dense weight beside the packed one and splits its rows by role: the leading
``dense_rows`` rows of a forward (prompt tokens, `AttentionMetadata.dense_rows`) take the dense
GEMM and the generated tokens' rows (decodes, verification blocks) the packed kernel, unless they
are more than PACKED_MAX_ROWS, where the dense GEMM is faster for them too.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "none", "int4", "int8")
INT4_GROUP = 32
# The packed kernels win up to about this many rows on a 2-core Zen 4 and lose beyond (int4 is
# 0.90x dense at 16 rows, 1.22x at 32: docs/benchmarks/quantization.md). A forward whose generated
# rows exceed it runs them dense too (and so does the drafter's head). That choice depends on the
# batch: at a near-tie a token computed in a large step can differ from the same token computed in
# a small one, as bf16 attention already can. DSPARK_PACKED_MAX_ROWS=0 removes the limit (every
# generated row packed: batch-invariant, slower at high concurrency).
PACKED_MAX_ROWS = int(os.environ.get("DSPARK_PACKED_MAX_ROWS", "24")) or 1 << 62

# GGUF tensor types by the packed format that keeps their precision (`auto`).
_GGUF_INT4 = ("Q4_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS")
_GGUF_INT8 = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "Q8_1", "Q8_K")


def gguf_kind(tensor_type: str) -> str:
    """The packed format `--quantization auto` gives a GGUF tensor of this type ("none": float)."""
    if tensor_type in _GGUF_INT8:
        return "int8"
    if tensor_type in _GGUF_INT4 or tensor_type.startswith(("Q2", "Q3", "IQ")):
        return "int4"  # 4 bits or fewer: int4 keeps at least their precision
    return "none"


class PackedWeight:
    """A [N, K] weight in a packed format; `mm(x)` is ``F.linear(x, w)`` for x of the model dtype."""

    def __init__(self, kind: str, packed: torch.Tensor, params: torch.Tensor, shape: tuple[int, int]):
        self.kind = kind
        self.packed = packed  # int4: the kernel's packed layout; int8: [N, K] int8 codes
        self.params = params  # int4: [K / 32, N, 2] scale and zero; int8: [N] scales (model dtype)
        self.shape = shape

    # ------------------------------------------------------------ building

    @classmethod
    def quantize(cls, w: torch.Tensor, kind: str, dtype: torch.dtype) -> PackedWeight:
        """Pack a float [N, K] weight (on the CPU) for activations of `dtype`."""
        w = w.detach().float().cpu()
        n, k = w.shape
        if kind == "int4":
            if k % INT4_GROUP:
                raise ValueError(f"int4 needs an input dimension divisible by {INT4_GROUP}, got {k}")
            g = w.view(n, k // INT4_GROUP, INT4_GROUP)
            lo = g.amin(-1, keepdim=True)
            hi = g.amax(-1, keepdim=True)
            scale = (hi - lo) / 15
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = ((g - lo) / safe).round().clamp(0, 15).to(torch.int32).view(n, k)
            zero = lo + 8 * scale  # w = scale * (q - 8) + zero = scale * q + lo
            params = torch.stack((scale.squeeze(-1), zero.squeeze(-1)), -1).transpose(0, 1).contiguous().to(dtype)
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
            return cls("int4", packed, params, (n, k))
        if kind == "int8":
            scale = w.abs().amax(1) / 127
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            codes = (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
            return cls("int8", codes, scale.to(dtype), (n, k))
        raise ValueError(f"unknown packed format {kind!r}")

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight this packs (tests and the dense copy's reference)."""
        n, k = self.shape
        if self.kind == "int8":
            return self.packed.float() * self.params.float()[:, None]
        eye = torch.eye(k, dtype=self.params.dtype)
        # the kernel itself is the reference for its layout: I @ W^T = W^T
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP, self.params).float().t()

    # ------------------------------------------------------------ compute

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.params)
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.params)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.params.numel() * self.params.element_size()


def packed_of(layer: nn.Module) -> PackedWeight | None:
    return getattr(layer, "packed_weight", None)


def takes_packed(packed: PackedWeight | None, rows: int) -> bool:
    """Whether `rows` rows go through `packed` (None: there is no packed weight) rather than the
    dense weight: the one rule for the projections, the head and the drafter's head."""
    return packed is not None and 0 < rows <= PACKED_MAX_ROWS


def linear(x: torch.Tensor, layer: nn.Linear, dense_rows: int = 0) -> torch.Tensor:
    """``layer(x)`` with the rows split by role: the first `dense_rows` rows through the dense
    weight, the others through the packed one (all dense when the layer has none)."""
    packed = packed_of(layer)
    if not takes_packed(packed, x.shape[0] - dense_rows):
        return F.linear(x, layer.weight, layer.bias)
    if dense_rows > 0:
        out = torch.cat((F.linear(x[:dense_rows], layer.weight), packed.mm(x[dense_rows:])))
    else:
        out = packed.mm(x)
    return out if layer.bias is None else out + layer.bias


def pack_linear(layer: nn.Linear, kind: str, dtype: torch.dtype) -> PackedWeight:
    """Attach a packed copy of `layer`'s weight for activations of `dtype` (the dense one stays,
    for prompt rows)."""
    packed = PackedWeight.quantize(layer.weight, kind, dtype)
    layer.packed_weight = packed
    return packed


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    return mode


def cpu_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
