"""How many positions the next step drafts, decided before it drafts (load-aware drafting).

Algorithm 1 decides what to VERIFY once the drafts exist; the drafting pass itself
is paid whatever it decides. At high load the plan verifies about one draft per
request, yet a drafter pass over gamma positions for every request costs a
large share of the step. `DraftBudget` decides before the pass, from the plans of
the last drafted steps only (the paper's asynchronous variant decides its
capacity the same way), so every decision is fixed before any draft token of
this step is sampled and the output stays exact:

- positions: the longest length the recent plans verified, plus one so the
  budget can grow again, at most gamma. The drafter's block and its Markov loop
  shrink with it (the backbone's cost scales with the block).
- whether to draft at all: drafting "paid" when the last few drafted steps'
  realised tokens over their measured seconds (the whole step: drafting pass,
  forward, verification and commit) beat the same requests decoded plainly
  (`DraftedSteps`); the plain step is priced from recently measured steps
  that drafted nothing, of about as many tokens (`PlainSteps`), else from this
  step's forward and the profiled shape of SPS (and the next step decodes
  plainly, to measure the alternative). After a step that did not pay,
  the next `backoff` steps decode plainly and the step after them drafts again
  as a probe; the backoff doubles while probes keep failing (up to
  `max_backoff`) and resets as soon as one pays.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Callable


class DraftBudget:
    def __init__(self, gamma: int, history: int = 8, max_backoff: int = 32):
        if gamma < 1 or history < 1 or max_backoff < 1:
            raise ValueError("gamma, history and max_backoff must be >= 1")
        self.gamma = gamma
        self.max_backoff = max_backoff
        self._lengths: deque[int] = deque(maxlen=history)  # longest verified draft of recent drafted steps
        self._backoff = 0  # plain steps to take after the next unpaid one is recorded (0: none)
        self._skip = 0  # plain steps left before the next probe
        self.plain_steps = 0  # steps this budget kept from drafting (a metric)

    def positions(self) -> int:
        """Positions to draft this step (0: decode plainly). Call once per step, before drafting."""
        if self._skip > 0:
            self._skip -= 1
            self.plain_steps += 1
            return 0
        if not self._lengths:
            return self.gamma
        return min(self.gamma, max(self._lengths) + 1)

    def record(self, longest: int, paid: bool, measure_plain: bool = False) -> None:
        """After a drafted step: the longest draft its plan verified, and whether drafting paid.
        `measure_plain`: the verdict had no measured plain step to compare with, so the next
        step decodes plainly (once) to measure one."""
        self._lengths.append(max(0, int(longest)))
        if paid:
            self._backoff = 0
            self._skip = 1 if measure_plain else 0
        else:
            self._backoff = min(self.max_backoff, max(1, 2 * self._backoff))
            self._skip = self._backoff


class PlainSteps:
    """Seconds of recent whole steps that drafted nothing, by the tokens of their forward: what a
    drafted step is judged against. A verification forward of B tokens (a few queries per
    sequence) costs more than a decode forward of B tokens, so the profiled SPS(B) overprices
    the plain alternative; a measured plain step of about as many tokens does not."""

    def __init__(self, horizon: int = 512, alpha: float = 0.25, tolerance: float = 1.25):
        self.horizon = horizon  # steps after which a measurement is too old to price with
        self.alpha = alpha  # EMA weight of a new measurement
        self.tolerance = tolerance  # largest token-count ratio a measurement prices across
        self._seen: dict[int, tuple[float, int]] = {}  # tokens -> (EMA seconds, step of last measurement)
        self._step = 0

    def tick(self) -> None:
        """A step that drafted: time passes for the measurements."""
        self._step += 1

    def observe(self, tokens: int, seconds: float) -> None:
        self._step += 1
        old = self._seen.get(tokens)
        fresh = old is None or self._step - old[1] > self.horizon
        self._seen[tokens] = (seconds if fresh else (1 - self.alpha) * old[0] + self.alpha * seconds, self._step)
        if len(self._seen) > 256:  # drop the stale ones
            self._seen = {k: v for k, v in self._seen.items() if self._step - v[1] <= self.horizon}

    def seconds(self, tokens: int, shape: Callable[[int, int], float]) -> float | None:
        """Price of a plain step of `tokens`: the nearest recent measurement within `tolerance`,
        moved along `shape(a, b)` (seconds(b) / seconds(a), the profiled curve); None without one."""
        best = None
        for k, (sec, at) in self._seen.items():
            if self._step - at > self.horizon:
                continue
            dist = abs(math.log(k / tokens))
            if dist <= math.log(self.tolerance) and (best is None or dist < best[0]):
                best = (dist, k, sec)
        return None if best is None else best[2] * (1.0 if best[1] == tokens else shape(best[1], tokens))


class DraftedSteps:
    """The verdict on drafting, from what the last `window` drafted steps REALISED: their output
    tokens (accepted drafts + 1 per drafting row, + 1 per other row that sampled) over their measured
    seconds, against the same rows decoded plainly (as many rows' tokens over the plain price of each
    step). Summed over a window, not judged step by step: a single row realises 1 or 1 + gamma tokens,
    so one step of one request says little, a few steps say what drafting is worth now. The plan's
    expected tokens are not used: calibrated confidences promised more than verification accepted
    (in the engine at c = 8: 789 expected, 665 realised), which kept drafting that lost."""

    def __init__(self, window: int = 4):
        if window < 1:
            raise ValueError("window must be >= 1")
        self._steps: deque[tuple[float, float, float, float]] = deque(maxlen=window)

    def record(self, tokens: float, seconds: float, plain_tokens: float, plain_seconds: float) -> bool:
        """One drafted step; returns whether the window's drafted steps beat plain decoding."""
        self._steps.append((float(tokens), float(seconds), float(plain_tokens), float(plain_seconds)))
        t, s, pt, ps = (sum(x[i] for x in self._steps) for i in range(4))
        return t * ps > pt * s
