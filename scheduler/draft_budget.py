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
- whether to draft at all: a drafted step "paid" when its plan's expected
  tokens over its measured seconds, drafting pass included, beat the same
  requests decoded plainly (the engine prices that plain step from the measured
  verify forward and the profiled shape of SPS). After a step that did not pay,
  the next `backoff` steps decode plainly and the step after them drafts again
  as a probe; the backoff doubles while probes keep failing (up to
  `max_backoff`) and resets as soon as one pays.
"""

from __future__ import annotations

from collections import deque


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

    def record(self, longest: int, paid: bool) -> None:
        """After a drafted step: the longest draft its plan verified, and whether drafting paid."""
        self._lengths.append(max(0, int(longest)))
        if paid:
            self._backoff = self._skip = 0
        else:
            self._backoff = min(self.max_backoff, max(1, 2 * self._backoff))
            self._skip = self._backoff
