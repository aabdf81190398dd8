"""`--dtype auto` on a CPU: chosen by timing bf16 against fp32 matrix products, overridable."""

import pytest
import torch

from dspark_serve.models import loader


@pytest.fixture(autouse=True)
def no_kept_measurement(monkeypatch):
    """Each test measures (or fakes) its own speedup: nothing is kept between them."""
    monkeypatch.setattr(loader, "_probe_cache_path", lambda: None)


def test_probe_measures_every_shape_and_is_cached(monkeypatch):
    monkeypatch.setattr(loader, "_cpu_dtype_probe", {})
    probe = loader.probe_cpu_bf16(repeats=1)
    assert set(probe["per_rows"]) == set(loader._PROBE_ROWS)
    assert all(v > 0 for v in probe["per_rows"].values())
    assert probe["speedup"] > 0 and probe["threads"] == torch.get_num_threads()
    assert loader.probe_cpu_bf16() is probe  # one measurement per thread count


@pytest.mark.parametrize("speedup,expected", [(2.2, torch.bfloat16), (1.3, torch.bfloat16),
                                              (1.1, torch.float32), (0.5, torch.float32)])
def test_auto_follows_the_measured_speedup(monkeypatch, speedup, expected):
    monkeypatch.delenv("DSPARK_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: True)
    monkeypatch.setattr(loader, "probe_cpu_bf16",
                        lambda fresh=False: {"speedup": speedup, "per_rows": {1: speedup}, "threads": 2})
    assert loader.auto_cpu_dtype() == expected
    assert loader.resolve_dtype("auto", torch.device("cpu")) == expected


def test_env_overrides_the_measurement(monkeypatch):
    def no_probe():
        raise AssertionError("the probe must not run when DSPARK_CPU_DTYPE is set")

    monkeypatch.setattr(loader, "probe_cpu_bf16", no_probe)
    monkeypatch.setenv("DSPARK_CPU_DTYPE", "bfloat16")
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.bfloat16
    monkeypatch.setenv("DSPARK_CPU_DTYPE", "float32")
    assert loader.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert loader.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16  # explicit wins
    monkeypatch.setenv("DSPARK_CPU_DTYPE", "fp8")
    with pytest.raises(ValueError, match="DSPARK_CPU_DTYPE"):
        loader.auto_cpu_dtype()


def test_no_probe_without_bf16_arithmetic(monkeypatch):
    """An AVX2-only CPU emulates bf16 (0.02x fp32 measured on one): float32 at once, no 30 s probe."""
    from dspark_serve.models import kernels

    def no_probe():
        raise AssertionError("the probe must not run on a CPU without bf16 arithmetic")

    monkeypatch.delenv("DSPARK_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "probe_cpu_bf16", no_probe)
    monkeypatch.setattr(kernels, "cpu_flags", lambda: {"avx2", "fma", "f16c"})
    assert not loader.cpu_has_bf16() and loader.auto_cpu_dtype() == torch.float32
    for flags in ({"avx2", "avx512_bf16"}, {"avx2", "amx_bf16"}, set(), {"neon", "bf16"}):
        monkeypatch.setattr(kernels, "cpu_flags", lambda flags=flags: flags)
        assert loader.cpu_has_bf16(), flags  # the probe decides


def test_auto_float32_packs_only_a_chosen_float32(monkeypatch):
    """`--quantization auto` packs float32 where --dtype auto chose it and our kernel serves it; where
    float32 was asked for (--dtype float32, DSPARK_CPU_DTYPE) it stays dense: the reference."""
    from dspark_serve.models import quant

    cpu = torch.device("cpu")
    monkeypatch.setattr(quant, "kernel_serves", lambda dtype: dtype == torch.float32)
    monkeypatch.delenv("DSPARK_CPU_DTYPE", raising=False)
    assert loader._auto_float32_packs("auto", torch.float32, cpu)
    assert not loader._auto_float32_packs("float32", torch.float32, cpu)
    assert not loader._auto_float32_packs("auto", torch.bfloat16, cpu)
    assert not loader._auto_float32_packs("auto", torch.float32, torch.device("cuda"))
    monkeypatch.setenv("DSPARK_CPU_DTYPE", "float32")
    assert not loader._auto_float32_packs("auto", torch.float32, cpu)
    monkeypatch.delenv("DSPARK_CPU_DTYPE")
    monkeypatch.setattr(quant, "kernel_serves", lambda dtype: False)
    assert not loader._auto_float32_packs("auto", torch.float32, cpu)


def test_the_measurement_is_kept_per_machine_and_retaken_near_the_bar(monkeypatch, tmp_path):
    """Every server on a machine serves in the same dtype: the first start measures and keeps the
    result, later starts read it. A speedup near the bar is measured three times, the median decides."""
    monkeypatch.delenv("DSPARK_CPU_DTYPE", raising=False)
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: True)
    kept = tmp_path / "probe.json"
    monkeypatch.setattr(loader, "_probe_cache_path", lambda: kept)
    calls = []

    def probe(fresh=False, seq=(1.17, 1.6, 1.5)):
        calls.append(fresh)
        s = seq[len(calls) - 1]
        return {"speedup": s, "per_rows": {1: s}, "threads": 2}

    monkeypatch.setattr(loader, "probe_cpu_bf16", probe)
    assert loader.auto_cpu_dtype() == torch.bfloat16  # median of 1.17, 1.6, 1.5
    assert calls == [False, True, True] and kept.exists()
    assert loader.measured_bf16_speedup()["measurements"] == [1.17, 1.6, 1.5]
    assert loader.auto_cpu_dtype() == torch.bfloat16 and len(calls) == 3  # read, not measured
    # far from the bar: one measurement
    kept.unlink()
    calls.clear()
    monkeypatch.setattr(loader, "probe_cpu_bf16", lambda fresh=False, seq=(4.0,): probe(fresh, seq))
    assert loader.auto_cpu_dtype() == torch.bfloat16 and calls == [False]
    # an unreadable file is measured again
    kept.write_text("{not json")
    calls.clear()
    assert loader.auto_cpu_dtype() == torch.bfloat16 and calls == [False]
