"""Weight-only quantized linears for the CPU: 4-bit and 8-bit packed weights.

A decode step on a CPU is bound by the bytes of weights it reads. Dequantizing a GGUF to bf16 reads
about 3.2x the bytes of its Q4_1 blocks; these linears keep the checkpoint's precision instead.
Two kernels, chosen at load (`PackedWeight.quantize`):

- **Ours** (``models/kernels``, the ``vnni`` layout; where the CPU has AVX-512 VNNI, or AVX2 with
  FMA and F16C (an AVX2 build of the same arithmetic, float32 activations only: `kernel_serves`),
  and a C++ compiler is present, else torch's).
  It takes float32 activations as well as bf16, so on AVX2 CPUs, where `--dtype auto` serves
  float32, `--quantization auto` packs too (models/loader.py). Weights in GGUF's own blocks of 32 with fp16 constants:
  ``int4`` is Q4_1 (w = d * q + m, q in 0..15), ``int8`` is Q8_0 (w = d * c); the GGUF's blocks map
  onto them exactly. Each activation row is quantized to int8 in groups of 32 and multiplied with
  integer dot products (llama.cpp's arithmetic): 2-3x torch's int4 kernel for 1-64 rows, and
  4-6x its int8 kernel on the output projection (docs/benchmarks/quantization-kernels.md).
- **torch's** (``torch`` layout; ``DSPARK_QUANT_KERNEL=torch``). ``int4``: 4-bit codes in groups
  of 32, w = (q - 8) * scale + zero with bf16 constants
  (``torch.ops.aten._weight_int4pack_mm_for_cpu``); Q4_1 maps onto it (the group's minimum is m,
  its maximum m + 15 d, so the min/max quantizer recovers every code). ``int8``: one scale per
  output channel (``torch.ops.aten._weight_int8pack_mm``); a Q8_0 tensor is re-quantized per
  channel at load: close to the checkpoint, not equal to it.

Other formats (Q4_0, K-quants, float checkpoints) are quantized at load with the same min/max
(int4) and max-abs (int8) rules. torchao's x86 wheel (0.18) ships CUDA kernels only and routes CPU
int4 through torch's aten operator, so it adds nothing here (docs/benchmarks/quantization.md).

Both kernels are batch-invariant: a row's result does not depend on the other rows of the call
(tests/models/test_quant.py checks it). With bf16 activations they are fastest for few rows (a
decode step reads the weights once); with many rows (prefill chunks) a dense bf16 GEMM is faster.
A target linear therefore keeps its dense weight beside the packed one and splits its rows by
role: the leading ``dense_rows`` rows of a forward (prompt tokens, `AttentionMetadata.dense_rows`)
take the dense GEMM and the generated tokens' rows (decodes, verification blocks) the packed
kernel, unless they are more than `max_rows` (the layout's limit), where the dense GEMM is faster
for them too.

With float32 activations our kernel serves every row (`PackedWeight.all_rows`): its int8 dot
products do four multiply-adds per lane where a float32 GEMM's FMA does one, so no float32 dense
GEMM catches up with it as rows grow. Measured on a 2-core AVX2 EPYC (the default model, whole
eager forwards, `python -m dspark_serve.loadtest.bench_prefill`): prompt chunks of 16-512 tokens
1.1-3.2x faster than through the dense float32 weights, a 64-token chunk beside 15 decodes 1.8x
(docs/benchmarks/prefill-packed-avx2.md). The prompt's activations are then quantized to int8 as
the generated tokens' are (llama.cpp's arithmetic for its prompts as well): the teacher-forced
perplexity of 12 ShareGPT texts went from 28.54 to 28.51.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("auto", "none", "int4", "int8")
INT4_GROUP = 32
VNNI_BLOCK = 16  # output channels per block of the vnni layout
# With bf16 activations the packed kernels win up to about this many rows on a 2-core Zen 4 and
# lose to a dense bf16 GEMM beyond (float32 activations on our kernel have no limit: `all_rows`): torch's int4 is 0.90x dense at 16 rows and 1.22x at 32 (docs/benchmarks/quantization.md);
# our VNNI kernel stays ahead up to about 64 (docs/benchmarks/quantization-kernels.md). A forward
# whose generated rows exceed the limit runs them dense too (and so does the drafter's head). That
# choice depends on the batch: at a near-tie a token computed in a large step can differ from the
# same token computed in a small one, as bf16 attention already can.
LAYOUT_MAX_ROWS = {"torch": 24, "vnni": 64}
# DSPARK_PACKED_MAX_ROWS overrides the layouts' limits; 0 removes the limit (every generated row
# packed: batch-invariant, slower at high concurrency). None: each layout's own.
_MAX_ROWS_ENV = os.environ.get("DSPARK_PACKED_MAX_ROWS")
PACKED_MAX_ROWS: int | None = (int(_MAX_ROWS_ENV) or 1 << 62) if _MAX_ROWS_ENV else None

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


def vnni_kernel() -> bool:
    """Whether our kernel (models/kernels: AVX-512 VNNI or AVX2 build) is available here."""
    from dspark_serve.models import kernels

    return kernels.load()


def kernel_serves(dtype: torch.dtype) -> bool:
    """Whether our kernel serves packed weights for activations of `dtype`; else torch's kernels do.
    The AVX-512 build serves every dtype. The AVX2 build serves float32 only: bf16 activations keep
    torch's packed kernels there, as before it existed (an AVX2 CPU has no paged-attention kernel,
    and int8-quantized activations would magnify the torch attention path's batch-shape rounding
    into different greedy answers for the same request alone and in a batch)."""
    from dspark_serve.models import kernels

    return kernels.load() and (kernels.isa() == "avx512" or dtype == torch.float32)


class PackedWeight:
    """A [N, K] weight in a packed format; `mm(x)` is ``F.linear(x, w)`` for x of the model dtype.

    Two layouts. ``vnni`` (where models/kernels builds; the default on AVX-512 VNNI CPUs): groups
    of 32 inputs with fp16 constants, GGUF's own Q4_1 (w = d * q + m) and Q8_0 (w = d * c) blocks,
    multiplied by int8-quantized activations with integer dot products. ``torch``: torch's int4
    layout (bf16 group constants) and int8 with one scale per output channel.
    """

    def __init__(self, kind: str, packed: torch.Tensor, params: torch.Tensor, shape: tuple[int, int],
                 layout: str = "torch", all_rows: bool = False):
        self.kind = kind
        self.layout = layout
        # every row of a call through the packed kernel, prompt rows and any number of them: our
        # kernel with float32 activations, which no float32 dense GEMM beats (the module's docstring)
        self.all_rows = all_rows
        self.packed = packed  # torch int4: the kernel's layout; torch int8: [N, K] codes; vnni: uint8 blocks
        self.params = params  # torch int4: [K / 32, N, 2]; torch int8: [N] scales; vnni: fp16 [N/16, K/32, 2, 16]
        self.shape = shape

    # ------------------------------------------------------------ building

    @classmethod
    def quantize(cls, w: torch.Tensor, kind: str, dtype: torch.dtype, layout: str | None = None) -> PackedWeight:
        """Pack a float [N, K] weight (on the CPU) for activations of `dtype`; `layout` None: vnni
        where the kernel is available and the shape fits its blocks (N % 16, K % 32), else torch."""
        w = w.detach().float().cpu()
        n, k = w.shape
        if kind not in ("int4", "int8"):
            raise ValueError(f"unknown packed format {kind!r}")
        if layout is None:
            layout = "vnni" if n % VNNI_BLOCK == 0 and k % INT4_GROUP == 0 and kernel_serves(dtype) else "torch"
        if layout == "vnni":
            if not vnni_kernel():
                from dspark_serve.models import kernels

                raise RuntimeError(f"the vnni layout's kernel is not available: {kernels.unavailable_reason()}")
            return cls._quantize_vnni(w, kind, all_rows=dtype == torch.float32)
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
        scale = w.abs().amax(1) / 127
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = (w / safe[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        return cls("int8", codes, scale.to(dtype), (n, k))

    @classmethod
    def _quantize_vnni(cls, w: torch.Tensor, kind: str, all_rows: bool = False) -> PackedWeight:
        n, k = w.shape
        if n % VNNI_BLOCK or k % INT4_GROUP:
            raise ValueError(f"the vnni layout needs N % {VNNI_BLOCK} == 0 and K % {INT4_GROUP} == 0, got {n} x {k}")
        g = w.view(n, k // INT4_GROUP, INT4_GROUP)
        if kind == "int4":  # GGUF Q4_1: the group's minimum is m (code 0), its maximum m + 15 d (code 15)
            lo = g.amin(-1)
            d = ((g.amax(-1) - lo) / 15).half()
            m = lo.half()
            safe = torch.where(d > 0, d.float(), torch.ones_like(lo))
            codes = ((g - m.float()[..., None]) / safe[..., None]).round().clamp(0, 15)
            second = m
        else:  # GGUF Q8_0: d = max|w| / 127, stored as u = c + 128
            d = (g.abs().amax(-1) / 127).half()
            safe = torch.where(d > 0, d.float(), torch.ones_like(d.float()))
            codes = (g / safe[..., None]).round().clamp(-127, 127) + 128
            second = d
        codes = codes.to(torch.uint8).view(n // VNNI_BLOCK, VNNI_BLOCK, k)
        nb = n // VNNI_BLOCK
        if kind == "int4":  # [block][oct][channel][j]: low nibble k = 8 oct + j, high nibble 8 oct + 4 + j
            c = codes.view(nb, VNNI_BLOCK, k // 8, 2, 4).permute(0, 2, 1, 4, 3)
            packed = (c[..., 0] | (c[..., 1] << 4)).contiguous().view(-1)
        else:  # [block][quad][channel][j]: k = 4 quad + j
            packed = codes.view(nb, VNNI_BLOCK, k // 4, 4).permute(0, 2, 1, 3).contiguous().view(-1)
        params = torch.stack((d.view(nb, VNNI_BLOCK, -1), second.view(nb, VNNI_BLOCK, -1)), 0)
        params = params.permute(1, 3, 0, 2).contiguous()  # [block][group][d | m-or-d][channel]
        return cls(kind, packed, params, (n, k), layout="vnni", all_rows=all_rows)

    def dequantize(self) -> torch.Tensor:
        """The float32 [N, K] weight this packs (tests and the dense copy's reference)."""
        n, k = self.shape
        if self.layout == "vnni":
            nb = n // VNNI_BLOCK
            if self.kind == "int4":
                b = self.packed.view(nb, k // 8, VNNI_BLOCK, 4)
                c = torch.stack((b & 0x0F, b >> 4), -1)  # [block][oct][channel][j][half]
                codes = c.permute(0, 2, 1, 4, 3).reshape(n, k).float()
            else:
                codes = self.packed.view(nb, k // 4, VNNI_BLOCK, 4).permute(0, 2, 1, 3).reshape(n, k).float() - 128
            p = self.params.float().permute(0, 3, 1, 2).reshape(n, k // INT4_GROUP, 2)  # [channel][group][2]
            g = codes.view(n, k // INT4_GROUP, INT4_GROUP)
            if self.kind == "int4":
                return (g * p[..., :1] + p[..., 1:]).view(n, k)
            return (g * p[..., :1]).view(n, k)
        if self.kind == "int8":
            return self.packed.float() * self.params.float()[:, None]
        eye = torch.eye(k, dtype=self.params.dtype)
        # the kernel itself is the reference for its layout: I @ W^T = W^T
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, INT4_GROUP, self.params).float().t()

    # ------------------------------------------------------------ compute

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "vnni":
            return torch.ops.dspark.quant_mm(x, self.packed, self.params, self.shape[0], 4 if self.kind == "int4" else 8)
        if self.kind == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.params)
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.params)

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.params.numel() * self.params.element_size()


def packed_of(layer: nn.Module) -> PackedWeight | None:
    return getattr(layer, "packed_weight", None)


def max_rows(packed: PackedWeight) -> int:
    """Most rows of one call that go through `packed` rather than the dense weight
    (DSPARK_PACKED_MAX_ROWS, else unbounded for an `all_rows` weight, else the layout's limit)."""
    if PACKED_MAX_ROWS is not None:
        return PACKED_MAX_ROWS
    return 1 << 62 if packed.all_rows else LAYOUT_MAX_ROWS[packed.layout]


def takes_packed(packed: PackedWeight | None, rows: int) -> bool:
    """Whether `rows` rows go through `packed` (None: there is no packed weight) rather than the
    dense weight: the one rule for the projections, the head and the drafter's head."""
    return packed is not None and 0 < rows <= max_rows(packed)


def linear(x: torch.Tensor, layer: nn.Linear, dense_rows: int = 0) -> torch.Tensor:
    """``layer(x)`` with the rows split by role: the first `dense_rows` rows through the dense
    weight (unless the packed weight serves all rows), the others through the packed one (all
    dense when the layer has none). `x` may have leading dimensions beyond the rows' (they are
    flattened)."""
    packed = packed_of(layer)
    if packed is not None and packed.all_rows:
        dense_rows = 0  # prompt rows too (the module's docstring)
    if x.dim() != 2:
        if not takes_packed(packed, x.numel() // x.shape[-1] - dense_rows):
            return F.linear(x, layer.weight, layer.bias)
        return linear(x.reshape(-1, x.shape[-1]), layer, dense_rows).view(*x.shape[:-1], -1)
    if not takes_packed(packed, x.shape[0] - dense_rows):
        return F.linear(x, layer.weight, layer.bias)
    if dense_rows > 0:
        out = torch.cat((F.linear(x[:dense_rows], layer.weight), packed.mm(x[dense_rows:])))
    else:
        out = packed.mm(x)
    return out if layer.bias is None else out + layer.bias


def pack_linear(layer: nn.Linear, kind: str, dtype: torch.dtype) -> PackedWeight:
    """Attach a packed copy of `layer`'s weight for activations of `dtype` (the dense one stays,
    for prompt rows where the packed weight does not serve them)."""
    packed = PackedWeight.quantize(layer.weight, kind, dtype)
    layer.packed_weight = packed
    return packed


def kernel_of(model) -> str:
    """Which kernels serve the model's packed weights: "vnni", "torch", both joined by "+", or
    "none" (the cost table and the prefix cache's salt key on it: they change the step's time and bits)."""
    linears = model.linears() if hasattr(model, "linears") else ()
    packed = [packed_of(layer) for _, layer in linears] + [getattr(model, "head_packed", None)]
    layouts = sorted({p.layout for p in packed if p is not None})
    return "+".join(layouts) or "none"


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {', '.join(MODES)}")
    return mode


def cpu_kernels_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(torch.ops.aten, "_weight_int8pack_mm")
