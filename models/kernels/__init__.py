"""CPU kernels of our own, compiled on first use: ``torch.ops.dspark.quant_mm`` (quant_mm.cpp) and
``torch.ops.dspark.paged_attention`` (paged_attention.cpp: few-query attention read straight from the
paged KV pool; models/attention.py).

They need a C++ compiler (the one torch.compile uses: g++ or $CXX) and a CPU with AVX-512 VNNI (Intel
Cascade Lake and later, AMD Zen 4 and later) or AVX2 with FMA and F16C (Intel Haswell and later, AMD
Zen 1-3: the quantized matmul with AVX2's integer dot products, for float32 activations, and the
paged attention with 8-float vectors). Paged attention serves bf16 and float32 pools on both builds. `isa()` says which build this CPU takes
(DSPARK_KERNEL_ISA=avx2 forces the AVX2 build, =none none). It is built once per source, ISA,
torch version and compiler into ``$DSPARK_CACHE_DIR/kernels`` (about 10 s), under a file lock so that concurrent
processes build it once, and loaded with ``torch.ops.load_library``. Where it cannot be built or
loaded, `load()` returns False, `unavailable_reason()` says why, and the caller keeps torch's own
packed kernels. ``DSPARK_QUANT_KERNEL=torch`` turns it off.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

_SOURCES = (Path(__file__).with_name("quant_mm.cpp"), Path(__file__).with_name("paged_attention.cpp"))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp")
# ISA -> (compiler flags, /proc/cpuinfo flags it needs), best first
_ISAS = {
    "avx512": (("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma"),
               ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")),
    "avx2": (("-mavx2", "-mf16c", "-mfma"), ("avx2", "f16c", "fma")),
}

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpuinfo(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_flags() -> set[str]:
    return set(_cpuinfo("flags").split())


def cpu_model() -> str:
    return _cpuinfo("model name")


def _compiler() -> str | None:
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _cache_dir() -> Path:
    from dspark_serve.models.loader import cache_dir

    return cache_dir() / "kernels"


def isa() -> str | None:
    """The kernel build this CPU runs: "avx512" where it has AVX-512 VNNI, else "avx2" where it has
    AVX2 + FMA + F16C, else None. DSPARK_KERNEL_ISA=avx2 selects the AVX2 build on an AVX-512 CPU
    too (to test it there), =none builds nothing."""
    flags = cpu_flags()
    forced = os.environ.get("DSPARK_KERNEL_ISA")
    for name, (_, needs) in _ISAS.items():
        if (forced is None or forced == name) and all(f in flags for f in needs):
            return name
    return None


def _build(cxx: str, target: str) -> Path:
    from torch.utils import cpp_extension

    flags = (*_FLAGS, *_ISAS[target][0])
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
    key = hashlib.sha256("\n".join((*(p.read_text() for p in _SOURCES), torch.__version__, version, " ".join(flags),
                                    str(torch._C._GLIBCXX_USE_CXX11_ABI))).encode()).hexdigest()[:16]
    out = _cache_dir() / f"dspark_kernels-{target}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same file
        if out.exists():
            return out
        libdirs = cpp_extension.library_paths()
        cmd = [cxx, *flags, f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               *[f"-I{p}" for p in cpp_extension.include_paths()], *map(str, _SOURCES),
               *[f"-L{p}" for p in libdirs], *[f"-Wl,-rpath,{p}" for p in libdirs], "-lc10", "-ltorch_cpu",
               "-o", str(out) + ".tmp"]
        log.info("building the CPU kernels (quantized matmul, paged attention; once per version, about 15 s)")
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed: {proc.stderr.strip()[-2000:]}")
        os.replace(str(out) + ".tmp", out)
    return out


def _why_not() -> str | None:
    if os.environ.get("DSPARK_QUANT_KERNEL", "auto") == "torch":
        return "DSPARK_QUANT_KERNEL=torch"
    if sys.platform != "linux":
        return f"built for Linux only (this is {sys.platform})"
    if isa() is None:
        return ("DSPARK_KERNEL_ISA=" + os.environ["DSPARK_KERNEL_ISA"] if os.environ.get("DSPARK_KERNEL_ISA")
                else "the CPU lacks both AVX-512 VNNI and AVX2 with FMA and F16C")
    if _compiler() is None:
        return "no C++ compiler (g++ or $CXX) on PATH"
    return None


def load() -> bool:
    """Build (once) and load the kernel; False where it is not available here (`unavailable_reason`)."""
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        reason = _why_not()
        if reason is None:
            try:
                target = isa()
                torch.ops.load_library(str(_build(_compiler(), target)))

                @torch.library.register_fake("dspark::quant_mm")
                def _(x, w, consts, n, bits):
                    return x.new_empty((x.shape[0], n))

                @torch.library.register_fake("dspark::paged_attention")
                def _(q, k_cache, v_cache, gather, context_lens, query_lens, k_new, v_new, scale, window):
                    return q.new_empty(q.shape)

                _state["isa"] = target
            except Exception as e:  # a broken toolchain must not stop the server: torch's kernels serve
                reason = f"the build or load failed: {e}"
                log.warning("VNNI quantized-matmul kernel unavailable (%s); using torch's packed kernels", reason)
        _state["ok"] = reason is None
        _state["reason"] = reason
        return reason is None


def paged_attention_available() -> bool:
    """Whether ``torch.ops.dspark.paged_attention`` was built (both builds have it)."""
    return load()


def unavailable_reason() -> str | None:
    load()
    return _state["reason"]  # type: ignore[return-value]
