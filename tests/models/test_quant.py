"""Packed (weight-only quantized) linears: exact Q4_1 recovery, batch invariance, the row split,
what `--quantization` packs, and greedy output with packed weights through the engine."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dspark_serve.engine import LLM, SamplingParams
from dspark_serve.models import kernels, quant
from dspark_serve.models.loader import load_model, quantization_kinds

needs_vnni = pytest.mark.skipif(not kernels.load(), reason=f"no VNNI kernel here: {kernels.unavailable_reason()}")
LAYOUTS = ["torch", pytest.param("vnni", marks=needs_vnni)]


def q4_1_weight(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight as GGUF's Q4_1 stores it: per group of 32, fp16 d and m, codes 0..15 with both ends used."""
    gen = torch.Generator().manual_seed(seed)
    g = k // 32
    d = (torch.rand(n, g, 1, generator=gen) * 0.02 + 1e-3).half().float()
    m = (torch.randn(n, g, 1, generator=gen) * 0.05).half().float()
    codes = torch.randint(0, 16, (n, g, 32), generator=gen)
    codes[..., 0], codes[..., 1] = 0, 15  # llama.cpp's quantizer maps the min to 0 and the max to 15
    w = (d * codes + m).view(n, k)  # float32, as gguf's dequantize computes it
    return w, codes.view(n, k), d.squeeze(-1), m.squeeze(-1)


def test_q4_1_codes_and_constants_are_recovered_exactly():
    w, codes, d, m = q4_1_weight(64, 256)
    packed = quant.PackedWeight.quantize(w, "int4", torch.float32, layout="torch")
    scale, zero = packed.params[..., 0].t(), packed.params[..., 1].t()
    torch.testing.assert_close(scale, d, rtol=1e-6, atol=0)
    torch.testing.assert_close(zero, m + 8 * d, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(packed.dequantize(), w, rtol=0, atol=1e-6)


@needs_vnni
def test_vnni_layout_keeps_q4_1_and_q8_0_blocks_bit_exact():
    """Our kernel's layout stores GGUF's own blocks: Q4_1's fp16 d and m and its codes come back
    bit for bit, and so do Q8_0's (d = max|w| / 127 per group, codes -127..127)."""
    w, codes, d, m = q4_1_weight(64, 256)
    packed = quant.PackedWeight.quantize(w, "int4", torch.bfloat16, layout="vnni")
    params = packed.params.permute(0, 3, 1, 2).reshape(64, 8, 2).float()  # [channel][group][d, m]
    assert torch.equal(params[..., 0], d) and torch.equal(params[..., 1], m)
    assert torch.equal(packed.dequantize(), w)
    gen = torch.Generator().manual_seed(3)
    d8 = (torch.rand(32, 4, 1, generator=gen) * 0.01 + 1e-4).half().float()
    c8 = torch.randint(-127, 128, (32, 4, 32), generator=gen)
    c8[..., 0] = 127
    w8 = (d8 * c8).view(32, 128)
    assert torch.equal(quant.PackedWeight.quantize(w8, "int8", torch.bfloat16, layout="vnni").dequantize(), w8)


@needs_vnni
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_vnni_kernel_computes_the_q8_activation_product(kind):
    """The kernel against a float64 reference of its arithmetic: each activation row quantized to
    int8 per group of 32 (round half to even), times the packed weight, summed per group. Catches a
    wrong nibble order, block layout or correction term (each would be off by far more than 1e-5)."""
    gen = torch.Generator().manual_seed(5)
    n, k = 48, 160
    packed = quant.PackedWeight.quantize(torch.randn(n, k, generator=gen) * 0.05, kind, torch.float32, layout="vnni")
    x = torch.randn(11, k, generator=gen) * 2
    g = x.view(11, k // 32, 32)
    sx = g.abs().amax(-1, keepdim=True) / 127
    xq = torch.round(g / torch.where(sx > 0, sx, torch.ones_like(sx)))
    ref = (xq * sx).view(11, k).double() @ packed.dequantize().double().t()
    got = packed.mm(x).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # and it is close to the unquantized product (int8 activations lose about 0.5%)
    torch.testing.assert_close(got, x.double() @ packed.dequantize().double().t(), rtol=0.05, atol=0.05)


@pytest.mark.skipif(not {"avx2", "fma", "f16c"} <= kernels.cpu_flags(), reason="no AVX2 + FMA + F16C here")
def test_the_avx2_build_computes_the_same_product(tmp_path):
    """The AVX2 build of quant_mm (CPUs without AVX-512 VNNI; forced with DSPARK_KERNEL_ISA so an
    AVX-512 machine tests it too) passes this file's kernel tests: the float64 reference of the
    kernel's arithmetic and batch invariance, int4 and int8, float32 and bf16 activations; and its
    paged attention passes tests/models/test_paged_attention_kernel.py (bf16 and float32 pools)."""
    import os
    import subprocess
    import sys

    if kernels.isa() == "avx2":
        pytest.skip("this CPU's own build is the AVX2 one: this file and test_paged_attention_kernel.py ran it in-process")
    env = {**os.environ, "DSPARK_CACHE_DIR": str(tmp_path), "DSPARK_KERNEL_ISA": "avx2"}
    isa = subprocess.run([sys.executable, "-c", "from dspark_serve.models import kernels, quant; import torch; "
                          "print(kernels.load(), kernels.isa(), kernels.paged_attention_available(), "
                          "*(quant.PackedWeight.quantize(torch.randn(32, 64), 'int4', dt).layout "
                          "for dt in (torch.float32, torch.bfloat16)))"],
                         capture_output=True, text=True, timeout=300, env=env)
    # paged attention in it; it serves float32 activations, bf16 ones keep torch's kernels
    assert isa.stdout.split() == ["True", "avx2", "True", "vnni", "torch"], isa.stderr[-2000:]
    tests = [f"{__file__}::test_vnni_kernel_computes_the_q8_activation_product", f"{__file__}::test_packed_matmul_is_batch_invariant"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "vnni", *tests],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]
    attention = str(Path(__file__).with_name("test_paged_attention_kernel.py"))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", attention],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0 and " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-3000:]


def test_kernel_falls_back_to_torch_when_it_cannot_build(tmp_path):
    """No compiler (or a broken one) and DSPARK_QUANT_KERNEL=torch both leave torch's kernels
    serving, with the reason; nothing raises."""
    import subprocess
    import sys

    code = ("from dspark_serve.models import kernels, quant; import torch; ok = kernels.load(); "
            "print(ok, kernels.unavailable_reason()); "
            "print(quant.PackedWeight.quantize(torch.randn(32, 64), 'int4', torch.bfloat16).layout)")
    if kernels.isa() is None:
        pytest.skip("no kernel build for this CPU at all")
    for env, why in (({"CXX": "/bin/false"}, "failed"), ({"DSPARK_QUANT_KERNEL": "torch"}, "DSPARK_QUANT_KERNEL"),
                     ({"DSPARK_KERNEL_ISA": "none"}, "DSPARK_KERNEL_ISA=none")):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                              env={**__import__("os").environ, "DSPARK_CACHE_DIR": str(tmp_path), **env})
        out = proc.stdout.splitlines()
        assert proc.returncode == 0, proc.stderr
        assert out[0].startswith("False") and why in out[0]
        assert out[1] == "torch"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["int4", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_matmul_is_batch_invariant(kind, dtype, layout):
    """A row's product does not depend on the other rows of the call (a decode row equals the same
    row inside a verification block): what keeps greedy speculation equal to plain decoding."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(96, 128, generator=gen) * 0.05
    packed = quant.PackedWeight.quantize(w, kind, dtype, layout=layout)
    x = torch.randn(40, 128, generator=gen).to(dtype)
    full = packed.mm(x)
    for rows in (1, 2, 3, 7, 8, 17, 33):
        assert torch.equal(packed.mm(x[:rows]), full[:rows])
    for i in (0, 5, 39):
        assert torch.equal(packed.mm(x[i:i + 1]), full[i:i + 1])
    ref = F.linear(x.float(), packed.dequantize())
    torch.testing.assert_close(full.float(), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_error_is_bounded_by_half_a_step(layout):
    """torch's layout: a step per output channel; ours: per group of 32 (fp16 steps, Q8_0)."""
    w = torch.randn(32, 64) * 0.1
    packed = quant.PackedWeight.quantize(w, "int8", torch.float32, layout=layout)
    if layout == "torch":
        step = w.abs().amax(1, keepdim=True) / 127
    else:
        step = (w.view(32, 2, 32).abs().amax(-1, keepdim=True) / 127).half().float().expand(32, 2, 32).reshape(32, 64)
    assert ((packed.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def _pack_split(layer: torch.nn.Linear) -> "quant.PackedWeight":
    """A packed weight that splits rows by role (torch's layout: not `all_rows`)."""
    packed = quant.PackedWeight.quantize(layer.weight, "int4", torch.float32, layout="torch")
    assert not packed.all_rows
    layer.packed_weight = packed
    return packed


def test_linear_splits_rows_by_role():
    """The first dense_rows rows take the dense weight, the rest the packed kernel; no packed
    weight, or all rows dense, is exactly F.linear."""
    layer = torch.nn.Linear(64, 48, bias=True)
    x = torch.randn(10, 64)
    with torch.no_grad():
        assert torch.equal(quant.linear(x, layer, 3), F.linear(x, layer.weight, layer.bias))
        packed = _pack_split(layer)
        out = quant.linear(x, layer, 3)
        assert torch.equal(out[:3], F.linear(x[:3], layer.weight, layer.bias))
        assert torch.equal(out[3:], packed.mm(x[3:]) + layer.bias)
        assert torch.equal(quant.linear(x, layer, 10), F.linear(x, layer.weight, layer.bias))
        assert not torch.equal(out[3:], F.linear(x[3:], layer.weight, layer.bias))  # the packed path really ran


@needs_vnni
def test_float32_on_our_kernel_packs_every_row(monkeypatch):
    """float32 activations on our kernel: prompt rows and any number of generated rows take the
    packed kernel (no float32 dense GEMM is faster); bf16 activations still split by role."""
    layer = torch.nn.Linear(64, 48, bias=False)
    x = torch.randn(200, 64)
    with torch.no_grad():
        packed = quant.pack_linear(layer, "int4", torch.float32)
        assert packed.layout == "vnni" and packed.all_rows and quant.max_rows(packed) > 10**9
        assert torch.equal(quant.linear(x, layer, 150), packed.mm(x))  # 150 prompt rows + 50: all packed
        assert not torch.equal(packed.mm(x[:150]), F.linear(x[:150], layer.weight))
        monkeypatch.setattr(quant, "PACKED_MAX_ROWS", 4)  # DSPARK_PACKED_MAX_ROWS still bounds it
        assert torch.equal(quant.linear(x[:7], layer, 2), F.linear(x[:7], layer.weight))
        if quant.kernel_serves(torch.bfloat16):
            bf = quant.PackedWeight.quantize(layer.weight, "int4", torch.bfloat16)
            assert bf.layout == "vnni" and not bf.all_rows


def test_gguf_kinds():
    assert quant.gguf_kind("Q4_1") == quant.gguf_kind("Q4_0") == quant.gguf_kind("Q4_K") == "int4"
    assert quant.gguf_kind("Q8_0") == quant.gguf_kind("Q6_K") == "int8"
    assert quant.gguf_kind("F16") == quant.gguf_kind("F32") == quant.gguf_kind("BF16") == "none"
    with pytest.raises(ValueError, match="unknown quantization"):
        quant.check_mode("int3")


def test_default_model_auto_keeps_the_checkpoint_formats():
    """The default GGUF stores its projections as Q4_1 and its (tied) embedding as Q8_0: auto packs
    the projections int4 and the head int8; every packed projection reproduces the checkpoint's
    float32 weights (the Q4_1 values) closely."""
    assert load_model(None, "float32", quantization="auto").model.quantization == "none"  # fp32: packed is slower
    lm = load_model(None, "bfloat16", quantization="auto")
    net = lm.model
    assert net.quantization == "int4+int8"
    assert net.head_packed is not None and net.head_packed.kind == "int8"
    layers = dict(net.linears())
    assert all(quant.packed_of(layer).kind == "int4" for layer in layers.values())
    layer = layers["layers.0.self_attn.qkv_proj"]  # its dense copy: the Q4_1 values rounded to bf16
    deq = quant.packed_of(layer).dequantize()
    # the group constants are bf16 too: a group is off by at most one bf16 step of its zero point
    torch.testing.assert_close(deq, layer.weight.float(), rtol=1 / 64, atol=8e-3)
    kinds = quantization_kinds("int4", net, {})
    assert set(kinds.values()) == {"int4"} and "head" in kinds


def test_float_checkpoints_stay_dense_under_auto(tiny_llama_dir):
    net = load_model(tiny_llama_dir, "bfloat16", quantization="auto").model
    assert net.quantization == "none" and net.head_packed is None
    assert all(quant.packed_of(layer) is None for _, layer in net.linears())
    assert load_model(tiny_llama_dir, "float32", quantization="int8").model.quantization == "int8"


def test_many_generated_rows_take_the_dense_weight(monkeypatch):
    """Beyond PACKED_MAX_ROWS generated rows the dense GEMM is faster: every row takes it."""
    layer = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        packed = _pack_split(layer)
        monkeypatch.setattr(quant, "PACKED_MAX_ROWS", 4)
        x = torch.randn(7, 64)
        assert torch.equal(quant.linear(x, layer, 2), F.linear(x, layer.weight))  # 5 generated rows: dense
        assert torch.equal(quant.linear(x, layer, 3)[3:], packed.mm(x[3:]))  # 4 generated rows: packed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_speculation_equals_plain_with_packed_weights(tiny_llama_dir, tiny_drafter_dir, dtype, layout,
                                                            monkeypatch):
    """int4 everywhere on the tiny model, every generated row packed (DSPARK_PACKED_MAX_ROWS=0):
    speculative greedy output equals plain greedy output, through mixed batches (prefills beside
    decodes and verification blocks) and preemptions (a small KV pool: a recompute chunk crosses
    the prompt's end and is split by the runner). The tiny model's top-1 margins are wide, so this
    checks the row layout and the split; the kernels' batch invariance is tested above."""
    monkeypatch.setattr(quant, "PACKED_MAX_ROWS", 1 << 62)
    if layout == "torch":
        monkeypatch.setattr(quant, "kernel_serves", lambda dtype: False)
    elif not quant.kernel_serves(getattr(torch, dtype)):
        pytest.skip(f"our kernel does not serve {dtype} activations in the {kernels.isa()} build")
    prompts = [[(7 * i + j) % 200 + 3 for j in range(5 + 9 * i)] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def run(spec):
        llm = LLM(tiny_llama_dir, dtype, quantization="int4", num_threads=1, block_size=4,
                  kv_cache_memory=kv_bytes, max_num_batched_tokens=64, speculative_config=spec)
        assert llm.engine.loaded.model.quantization == "int4"
        assert {quant.packed_of(m).layout for _, m in llm.engine.loaded.model.linears()} == {layout}
        outs = llm.generate(prompts, params)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats.preemptions

    itemsize = torch.finfo(getattr(torch, dtype)).bits // 8
    kv_bytes = 120 * 4 * 2 * 2 * 1 * 16 * itemsize  # ~120 target blocks: enough for one request, too few for all
    plain, _ = run({"method": "none"})
    # no draft skipping: it keys on measured step times, and where the drafter pass is slow (bf16
    # without native bf16 matmuls) it would stop the drafts whose slots make the pool overflow
    spec, preempted = run({"method": "dspark", "model": tiny_drafter_dir, "verification": "fixed",
                           "draft_skipping": False})
    assert spec == plain
    assert preempted > 0
