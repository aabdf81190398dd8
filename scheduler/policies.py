"""Verification-length policies: per request, how many drafted tokens the target verifies.

A policy sees the conditional confidences c[r][k] of every decoding request's
drafts and a per-request cap (max_tokens left, context left, a request's own
limit) and returns l[r] in [0, cap[r]]. It never looks at the draft tokens'
values beyond what the confidences carry, which keeps verification lossless.
"""

from __future__ import annotations

from typing import Sequence


class VerifyPolicy:
    name = "base"

    def plan(self, confidences: Sequence[Sequence[float]], caps: Sequence[int]) -> list[int]:
        raise NotImplementedError


class FixedPolicy(VerifyPolicy):
    """Verify every drafted token (DFlash / MTP-k style): l = min(gamma, cap)."""

    name = "fixed"

    def __init__(self, gamma: int):
        self.gamma = gamma

    def plan(self, confidences, caps):
        return [min(self.gamma, c) for c in caps]


class OffPolicy(VerifyPolicy):
    """No speculation: plain decoding through the same step."""

    name = "off"

    def plan(self, confidences, caps):
        return [0 for _ in caps]


def make_policy(name: str, gamma: int) -> VerifyPolicy:
    if name == "fixed":
        return FixedPolicy(gamma)
    if name == "off":
        return OffPolicy()
    raise ValueError(f"unknown verification policy {name!r}; available: fixed, off")
