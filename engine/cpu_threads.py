"""How many torch threads a CPU engine uses when --num-threads is not given.

`os.cpu_count()` is the wrong answer in the places people serve from: in a Kubernetes pod it is
the node's CPU count while the pod may hold two CPUs of quota (32 threads then fight over 2 CPUs
and every step slows several-fold), and with SMT it counts hyperthreads, which add nothing to
matrix products that are bound by memory bandwidth and the vector units. The default is
therefore the smallest of: the CPUs this process may run on (its affinity mask), the cgroup CPU
quota rounded up (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), and the
physical cores among the allowed CPUs (one per SMT sibling group). The server's own threads
(event loop, HTTP, detokenization) mostly wait on the engine and are not subtracted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def _allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs of quota for this cgroup, or None when unlimited or unknown."""
    try:
        v2 = root / "cpu.max"
        if v2.exists():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        for base in (root / "cpu", root / "cpu,cpuacct", root):
            q, p = base / "cpu.cfs_quota_us", base / "cpu.cfs_period_us"
            if q.exists() and p.exists():
                quota = int(q.read_text())
                return None if quota <= 0 else quota / int(p.read_text())
    except (OSError, ValueError):
        return None
    return None


def physical_cores(cpus: set[int], sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct SMT sibling groups among `cpus` (len(cpus) when the topology is unreadable)."""
    groups = set()
    for cpu in cpus:
        try:
            groups.add((sys_cpu / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return len(groups) or len(cpus)


def default_num_threads(cgroup_root: Path = Path("/sys/fs/cgroup"),
                        sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    cpus = _allowed_cpus()
    n = physical_cores(cpus, sys_cpu)
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        n = min(n, math.ceil(limit))
    return max(1, n)
