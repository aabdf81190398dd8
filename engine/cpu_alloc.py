"""Keep large freed buffers inside the process on a CPU (glibc malloc tuning).

A CPU decode step allocates and frees many multi-megabyte tensors (gathered K/V, attention
scores, activations of a 64-sequence batch). glibc serves every allocation above its mmap
threshold with a fresh mmap and returns it to the kernel on free, so each step page-faults
and zeroes those megabytes again: on a 2-core machine that was almost half of a
continuous-batching step (64 ShareGPT sequences, bf16: 265 -> 149 ms mean step, 1.78x output
tokens/s; docs/benchmarks/batching.md).
Raising the mmap and trim thresholds makes glibc reuse the freed memory instead, the effect
PyTorch's CPU tuning guide gets from jemalloc/tcmalloc. The cost: the process keeps its peak
heap (RSS does not shrink after a burst). `DSPARK_MALLOC_TUNING=0` turns it off."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (1 << 30, 32 << 20)  # the first this glibc accepts (older ones cap it at 32 MiB)
TRIM_THRESHOLD = 1 << 30

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc once per process; True when it is in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if os.environ.get("DSPARK_MALLOC_TUNING", "1").lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mmap = next((t for t in MMAP_THRESHOLDS if mallopt(_M_MMAP_THRESHOLD, t)), None)
    _done = mmap is not None and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if _done:
        log.info("glibc malloc: mmap threshold %d MiB, trim threshold %d MiB (DSPARK_MALLOC_TUNING=0 disables)",
                 mmap >> 20, TRIM_THRESHOLD >> 20)
    return _done
