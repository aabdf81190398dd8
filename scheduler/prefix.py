"""Hardware-aware verification lengths: the DSpark prefix scheduler (REFERENCE.md Algorithm 1).

Every decoding request r has drafted gamma tokens with conditional
confidences c[r][k]; its prefix survival a[r][j] = prod_{i<=j} c[r][i] is the
probability that drafts 1..j are all accepted, i.e. the expected tokens that
verifying draft j adds. Verifying more drafts makes the target forward larger
(B tokens) and slower (SPS(B) steps/s). The scheduler admits candidates
(r, j) in order of a, best first, while the expected throughput
theta = tau * SPS(B) keeps improving, and stops at the first candidate that
does not improve it.

`fixed_seconds` (optional, per plan) is the part of this step's time that
does not depend on B: the drafting pass, which has already run when the plan
is made. The engine's cost table holds the verification forward alone, and
the plan maximises tau / (1 / SPS(B) + fixed_seconds), the expected tokens
per second of the whole step (target and drafter). A constant of the step
cannot depend on any draft token, so the early stop stays lossless.

That early stop is what keeps speculative decoding lossless: whether draft
x_{r,j} is verified must not depend on x_{r,j} itself, yet a[r][j+1] does
(the Markov head feeds x_{r,j} into c[r][j+1]). With the early stop, the
decision about (r, j) only looks at candidates ranked before it, and
(r, j+1) is always ranked after (r, j). A global argmax over all prefixes of
the ranking (the tests' `RetrospectiveScheduler`) would let a[r][j+1] decide whether
x_{r,j} is verified, and biases the output (REFERENCE.md Appendix A; the
tests reproduce the bias).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Sequence

from .cost_table import CostTable
from .policies import VerifyPolicy


@dataclass
class PlanResult:
    """What a plan decided, for metrics."""

    lengths: list[int]  # verified drafts per request, l[r]
    num_tokens: float  # B of the verification forward: R + base_tokens + sum(l)
    expected_tokens: float  # tau: R bonus tokens + sum of admitted a[r][j]
    theta: float  # (tau + other_tokens) * rate(B): expected tokens per second of the whole step
    num_candidates: int = 0  # (r, j) with a > 0 within the caps
    weighted_drafts: int = 0  # drafts of rows weighted above 1 (speed floors) the plan verified


def as_rows(confidences) -> list[list[float]]:
    """Confidences as plain Python rows: lists, tuples, numpy arrays and torch tensors are accepted."""
    if hasattr(confidences, "detach"):  # torch tensor
        confidences = confidences.detach().float().cpu()
    if hasattr(confidences, "tolist"):
        confidences = confidences.tolist()
    return [list(row) for row in confidences]


def _clean(c: float) -> float:
    # NaN or out-of-range confidences from a broken head must not admit anything odd.
    if not c > 0.0:  # also catches NaN
        return 0.0
    return 1.0 if c > 1.0 else float(c)


def rows_and_limits(confidences, caps: Sequence[int] | None) -> list[tuple[list[float], int]]:
    """Each request's confidences with the most drafts it may verify (its row length, capped)."""
    rows = as_rows(confidences)
    if caps is not None and len(caps) != len(rows):
        raise ValueError(f"{len(caps)} caps for {len(rows)} requests")
    return [(row, len(row) if caps is None else max(0, min(len(row), int(caps[r])))) for r, row in enumerate(rows)]


def candidates(confidences, caps: Sequence[int] | None = None,
               weights: Sequence[float] | None = None) -> list[tuple[float, int, int]]:
    """All (a, j, r) with a[r][j] > 0 and j <= cap[r], ranked: a descending (w[r] * a with
    `weights`), then smaller j, then smaller r.

    j is 1-based (the number of drafts verified if (r, j) is the last admitted one).
    """
    out = []
    for r, (row, limit) in enumerate(rows_and_limits(confidences, caps)):
        a = 1.0
        for j in range(1, limit + 1):
            a *= _clean(row[j - 1])
            if a <= 0.0:
                break
            out.append((a, j, r))
    if weights is None:
        out.sort(key=lambda t: (-t[0], t[1], t[2]))
    else:
        out.sort(key=lambda t: (-weights[t[2]] * t[0], t[1], t[2]))
    return out


def step_rate(cost_table: CostTable, num_tokens: float, fixed_seconds: float = 0.0) -> float:
    """Steps per second of a step whose verification forward has `num_tokens` tokens, with
    `fixed_seconds` of work (the drafting pass) that does not depend on them."""
    sps = cost_table.sps(num_tokens)
    if not fixed_seconds > 0.0 or not math.isfinite(fixed_seconds):
        return sps
    return 1.0 / (1.0 / sps + fixed_seconds) if sps > 0 else 0.0


class PrefixScheduler(VerifyPolicy):
    """Algorithm 1: greedy admission by prefix survival with an early stop (lossless)."""

    name = "scheduled"

    def __init__(self, cost_table: CostTable):
        if cost_table is None:
            raise ValueError("PrefixScheduler needs a cost table (SPS(B))")
        self.cost_table = cost_table
        self.last: PlanResult | None = None

    def plan(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0,
             fixed_seconds: float = 0.0, other_tokens: int = 0, weights: Sequence[float] | None = None) -> list[int]:
        extra = {} if weights is None else {"weights": weights}
        return self.plan_with_stats(confidences, caps, base_tokens, fixed_seconds, other_tokens, **extra).lengths

    def plan_with_stats(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0,
                        fixed_seconds: float = 0.0, other_tokens: int = 0,
                        weights: Sequence[float] | None = None) -> PlanResult:
        """`base_tokens`: the forward's tokens that are not these requests' (prefill chunks, decoding
        requests that do not draft); `other_tokens`: the tokens those rows emit this step (one per
        such decoding request or finished prompt). The step's output is theirs plus tau: a draft
        worth a tokens is weighed against slowing them too.

        `weights` (speed floors, scheduler/sla.py): per request, how much one of its tokens is worth
        (>= 1; a request below its speed floor more). The greedy then maximises the weighted
        throughput (sum of w[r] x its expected tokens + other) x SPS(B), ranking candidates by
        w[r] * a. With every weight 1 (or None) the plan is exactly Algorithm 1's."""
        rows = as_rows(confidences)
        if weights is not None:
            if len(weights) != len(rows):
                raise ValueError(f"{len(weights)} weights for {len(rows)} requests")
            weights = [w if w > 1.0 and math.isfinite(w) else 1.0 for w in weights]
            if all(w == 1.0 for w in weights):
                weights = None
        result = self._search(rows, candidates(rows, caps, weights), base_tokens, early_stop=True,
                              fixed_seconds=fixed_seconds, other_tokens=other_tokens, weights=weights)
        self.last = result
        return result

    def _search(self, rows, ranked, base_tokens: int, early_stop: bool, fixed_seconds: float = 0.0,
                other_tokens: int = 0, weights: Sequence[float] | None = None) -> PlanResult:
        R = len(rows)
        table = self.cost_table

        def sps(b):
            return step_rate(table, b, fixed_seconds)

        lengths = [0] * R
        B = R + base_tokens  # every request's anchor, plus prefill tokens riding in the same forward
        tau = float(R)  # each round emits at least one token per request (correction or bonus)
        value = float(sum(weights)) if weights is not None else tau  # tau weighted by w[r]
        best = (value + other_tokens) * sps(B) if R else 0.0
        best_lengths, best_B, best_tau = list(lengths), B, tau
        for a, j, r in ranked:
            lengths[r] = j
            B += 1
            tau += a
            value += a * (weights[r] if weights is not None else 1.0)
            theta = (value + other_tokens) * sps(B)
            if theta > best:
                best, best_lengths, best_B, best_tau = theta, list(lengths), B, tau
            elif early_stop:
                break
        weighted = sum(l for l, w in zip(best_lengths, weights) if w > 1.0) if weights is not None else 0
        return PlanResult(best_lengths, best_B, best_tau, best, len(ranked), weighted)


def best_capacity(ranked_a: Sequence[float], num_requests: int, base_tokens: int, cost_table: CostTable,
                  fixed_seconds: float = 0.0, other_tokens: int = 0) -> int:
    """K maximising (R + other + sum of the top-K a) * rate(R + base + K) over all K (no early stop)."""

    def sps(b):
        return step_rate(cost_table, b, fixed_seconds)

    B = num_requests + base_tokens
    tau = float(num_requests + other_tokens)
    best = tau * sps(B) if num_requests else 0.0
    best_k = 0
    for k, a in enumerate(ranked_a, start=1):
        tau += a
        theta = tau * sps(B + k)
        if theta > best:
            best, best_k = theta, k
    return best_k


class AsyncPrefixScheduler(PrefixScheduler):
    """Production variant (paper section 5.2): capacity from two steps ago, top-K of the current step.

    The capacity K (drafts verified in this step, summed over requests) is the
    unconstrained global optimum over the confidences recorded `lag` steps
    earlier, so computing it can overlap the GPU pipeline and it can jump over
    jagged SPS cliffs. It is fixed before the current drafts exist, and
    admitting the top-K current (r, j) by a (ties: smaller j, then smaller r)
    is prefix-closed and rank-preserving: whether (r, j) is admitted depends
    only on candidates ranked before it, never on x_{r,j}. So it stays lossless.
    Until `lag` steps have been seen it falls back to Algorithm 1 on the current step.
    """

    name = "async"

    def __init__(self, cost_table: CostTable, lag: int = 2):
        super().__init__(cost_table)
        if lag < 1:
            raise ValueError("lag must be >= 1")
        self.lag = lag
        # Per past step: (ranked a values within the caps, R, base_tokens, fixed_seconds).
        self._history: deque[tuple[list[float], int, int, float, int]] = deque(maxlen=lag)
        self.capacity: int | None = None  # K used by the latest plan (None until one was made)

    def reset(self) -> None:
        self._history.clear()
        self.capacity = None

    def plan_with_stats(self, confidences, caps=None, base_tokens: int = 0, fixed_seconds: float = 0.0,
                        other_tokens: int = 0) -> PlanResult:
        rows = as_rows(confidences)
        ranked = candidates(rows, caps)
        R = len(rows)
        if len(self._history) < self.lag:
            result = self._search(rows, ranked, base_tokens, early_stop=True, fixed_seconds=fixed_seconds,
                                  other_tokens=other_tokens)
            self.capacity = sum(result.lengths)
        else:
            old_a, old_R, old_base, old_fixed, old_other = self._history[0]  # `lag` steps ago
            K = best_capacity(old_a, old_R, old_base, self.cost_table, old_fixed, old_other)
            self.capacity = K
            lengths = [0] * R
            tau = float(R)
            for a, j, r in ranked[:K]:
                lengths[r] = j  # ranked order visits (r, j) before (r, j+1): the max is the last one seen
                tau += a
            B = R + base_tokens + min(K, len(ranked))
            result = PlanResult(lengths, B, tau, (tau + other_tokens) * step_rate(self.cost_table, B, fixed_seconds)
                                if R else 0.0, len(ranked))
        self._history.append(([a for a, _, _ in ranked], R, base_tokens, fixed_seconds, other_tokens))
        self.last = result
        return result


class ThresholdPolicy(VerifyPolicy):
    """Static baseline: verify while c_k >= t (or, cumulative, while a_k >= t)."""

    name = "threshold"

    def __init__(self, threshold: float = 0.5, cumulative: bool = False):
        if not 0.0 <= threshold <= 1.0 or math.isnan(threshold):
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.cumulative = cumulative

    def plan(self, confidences, caps: Sequence[int] | None = None, base_tokens: int = 0) -> list[int]:
        out = []
        for row, limit in rows_and_limits(confidences, caps):
            l, a = 0, 1.0
            while l < limit:
                c = _clean(row[l])
                a *= c
                if (a if self.cumulative else c) < self.threshold or c <= 0.0:
                    break
                l += 1
            out.append(l)
        return out
