"""Verification-length policies: per request, how many drafted tokens the target verifies.

A policy sees the conditional confidences c[r][k] of every decoding request's
drafts and a per-request cap (max_tokens left, context left, a request's own
limit) and returns l[r] in [0, cap[r]]. It never looks at the draft tokens'
values beyond what the confidences carry, which keeps verification lossless.

All policies share one call: `plan(confidences, caps, base_tokens=0) -> list[int]`
where `confidences` is R rows of gamma values (lists or a 2-D tensor), `caps`
is R ints (None: no cap beyond gamma) and `base_tokens` counts the prefill
tokens that ride in the same verification forward.
"""

from __future__ import annotations

from typing import Sequence


class VerifyPolicy:
    name = "base"

    def plan(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0) -> list[int]:
        raise NotImplementedError


def _num_rows(confidences, caps) -> int:
    if caps is not None:
        return len(caps)
    return len(confidences)


def _row_lengths(confidences, n: int) -> list[int]:
    """Drafts available per request (the row lengths), so no policy verifies tokens that were not drafted."""
    shape = getattr(confidences, "shape", None)
    if shape is not None and len(shape) == 2:
        return [int(shape[1])] * n
    return [len(row) for row in confidences]


class FixedPolicy(VerifyPolicy):
    """Verify every drafted token (DFlash / MTP-k style): l = min(gamma, cap, drafted)."""

    name = "fixed"

    def __init__(self, gamma: int):
        if gamma < 0:
            raise ValueError("gamma must be >= 0")
        self.gamma = gamma

    def plan(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0) -> list[int]:
        n = _num_rows(confidences, caps)
        drafted = _row_lengths(confidences, n)
        if caps is None:
            caps = drafted
        if len(drafted) != len(caps):
            raise ValueError(f"{len(caps)} caps for {len(drafted)} requests")
        return [max(0, min(self.gamma, int(c), d)) for c, d in zip(caps, drafted)]


class OffPolicy(VerifyPolicy):
    """No speculation: plain decoding through the same step."""

    name = "off"

    def plan(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0) -> list[int]:
        return [0] * _num_rows(confidences, caps)


POLICY_NAMES = ("scheduled", "async", "threshold", "fixed", "off")


def make_policy(name: str, gamma: int, cost_table=None, **options) -> VerifyPolicy:
    """Build a policy by name.

    scheduled  PrefixScheduler(cost_table)                 (the DSpark default; needs cost_table)
    async      AsyncPrefixScheduler(cost_table, lag=2)     (needs cost_table; option: lag)
    threshold  ThresholdPolicy(threshold=0.5, cumulative=False)
    fixed      FixedPolicy(gamma)
    off        OffPolicy()
    """
    from .prefix import AsyncPrefixScheduler, PrefixScheduler, ThresholdPolicy

    def no_options():
        if options:
            raise ValueError(f"policy {name!r} takes no options, got {sorted(options)}")

    def need_table():
        if cost_table is None:
            raise ValueError(f"verification policy {name!r} needs a cost table (SPS(B)); profile or load one first")

    if name == "scheduled":
        need_table()
        no_options()
        return PrefixScheduler(cost_table)
    if name == "async":
        need_table()
        unknown = set(options) - {"lag"}
        if unknown:
            raise ValueError(f"policy 'async' accepts option lag, got {sorted(unknown)}")
        return AsyncPrefixScheduler(cost_table, **options)
    if name == "threshold":
        unknown = set(options) - {"threshold", "cumulative"}
        if unknown:
            raise ValueError(f"policy 'threshold' accepts options threshold, cumulative, got {sorted(unknown)}")
        return ThresholdPolicy(**options)
    if name == "fixed":
        no_options()
        return FixedPolicy(gamma)
    if name == "off":
        no_options()
        return OffPolicy()
    raise ValueError(f"unknown verification policy {name!r}; available: {', '.join(POLICY_NAMES)}")
