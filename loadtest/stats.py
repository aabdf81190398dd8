"""Aggregates of a run: percentiles, throughput, goodput under an SLA."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

from .client import RequestResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default method)."""
    if not values:
        return None
    xs = sorted(values)
    rank = (len(xs) - 1) * q / 100.0
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def describe(values: Iterable[float | None]) -> dict:
    xs = [float(v) for v in values if v is not None]
    out = {"n": len(xs), "mean": sum(xs) / len(xs) if xs else None}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q)
    out["min"] = min(xs) if xs else None
    out["max"] = max(xs) if xs else None
    return out


@dataclass
class SLA:
    min_tokens_per_s_per_user: float | None = None
    max_ttft: float | None = None

    @property
    def active(self) -> bool:
        return self.min_tokens_per_s_per_user is not None or self.max_ttft is not None

    def met_by(self, r: RequestResult) -> bool:
        """A successful request whose per-user speed and TTFT are within bounds.

        A request with fewer than two output tokens has no per-user speed: it
        does not meet a speed bound.
        """
        if not r.ok:
            return False
        if self.min_tokens_per_s_per_user is not None:
            speed = r.tokens_per_s_per_user
            if speed is None or speed < self.min_tokens_per_s_per_user:
                return False
        if self.max_ttft is not None and (r.ttft is None or r.ttft > self.max_ttft):
            return False
        return True

    def to_dict(self) -> dict:
        return {"min_tokens_per_s_per_user": self.min_tokens_per_s_per_user, "max_ttft_s": self.max_ttft}


def error_key(r: RequestResult) -> str:
    if r.status is not None and r.status != 200:
        return str(r.status)
    if r.error and ":" in r.error and r.status is None:
        return r.error.split(":", 1)[0]  # the exception class, e.g. ConnectError / ReadTimeout
    return "stream_error" if r.status == 200 else "error"


def summarize(results: list[RequestResult], duration: float, sla: SLA | None = None, incomplete: int = 0) -> dict:
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    duration = max(duration, 1e-9)
    out_tokens = sum(r.output_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens or 0 for r in ok)
    summary = {
        "requests_sent": len(results) + incomplete,
        "requests_completed": len(ok),
        "requests_failed": len(failed),
        "requests_incomplete": incomplete,  # still running when --max-duration ended the run
        "errors_by_status": dict(sorted(Counter(error_key(r) for r in failed).items())),
        "error_examples": sorted({r.error for r in failed if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(ok) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (out_tokens + prompt_tokens) / duration,
        "output_tokens_total": out_tokens,
        "prompt_tokens_total": prompt_tokens,
        "usage_reported_fraction": (sum(r.usage_reported for r in ok) / len(ok)) if ok else None,
        "ttft_s": describe(r.ttft for r in ok),
        "itl_s": describe(x for r in ok for x in r.itl),
        "tpot_s": describe(r.tpot for r in ok),
        "tokens_per_s_per_user": describe(r.tokens_per_s_per_user for r in ok),
        "e2e_s": describe(r.e2e for r in ok),
        "output_tokens": describe(r.output_tokens for r in ok),
        "prompt_tokens": describe(r.prompt_tokens for r in ok),
    }
    if sla is not None and sla.active:
        good = [r for r in ok if sla.met_by(r)]
        summary["goodput"] = {
            "sla": sla.to_dict(),
            "requests": len(good),
            "fraction_of_completed": len(good) / len(ok) if ok else None,
            "request_throughput": len(good) / duration,
            "output_token_throughput": sum(r.output_tokens for r in good) / duration,
        }
    else:
        summary["goodput"] = None
    return summary


_ROWS = [
    ("TTFT (ms)", "ttft_s", 1000.0),
    ("ITL, per chunk (ms)", "itl_s", 1000.0),
    ("TPOT (ms)", "tpot_s", 1000.0),
    ("tokens/s per user", "tokens_per_s_per_user", 1.0),
    ("E2E latency (s)", "e2e_s", 1.0),
    ("output tokens", "output_tokens", 1.0),
]


def fmt(v, scale=1.0) -> str:
    if v is None:
        return "-"
    v = v * scale
    return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def markdown_table(summary: dict, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    s = summary
    lines.append(
        f"{s['requests_completed']} completed, {s['requests_failed']} failed"
        + (f" ({', '.join(f'{k}: {v}' for k, v in s['errors_by_status'].items())})" if s["errors_by_status"] else "")
        + (f", {s['requests_incomplete']} cut off by --max-duration" if s["requests_incomplete"] else "")
        + f" in {s['duration_s']:.2f} s: {s['request_throughput']:.3g} req/s, "
        f"{s['output_token_throughput']:.1f} output tokens/s"
    )
    g = s.get("goodput")
    if g:
        sla = ", ".join(f"{k} {v}" for k, v in g["sla"].items() if v is not None)
        lines[-1] += (f"; goodput ({sla}): {g['requests']} requests, {g['request_throughput']:.3g} req/s, "
                      f"{g['output_token_throughput']:.1f} output tokens/s")
    lines += ["", "| metric | mean | p50 | p90 | p99 |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, key, scale in _ROWS:
        d = s[key]
        lines.append(f"| {label} | " + " | ".join(fmt(d[k], scale) for k in ("mean", "p50", "p90", "p99")) + " |")
    return "\n".join(lines) + "\n"
