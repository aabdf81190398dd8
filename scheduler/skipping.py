"""Draft skipping: stop drafting for requests whose drafts do not pay for themselves.

The prefix scheduler decides how many drafts to VERIFY, but the drafting pass
itself is paid by every request that drafts (the paper's stated limitation:
the drafter always runs). `DraftSkipper` decides per request, before the
drafting pass, whether it drafts this step.

Rule (docs/scheduler.md has the derivation): request r keeps drafting while

    U_r = g_r + z * sd_r / sqrt(n_r)  >=  max(min_gain, margin * s(n) * Theta)

- g_r, sd_r: EMA mean and standard deviation of the tokens drafting gained r
  per drafted round (the calibrated expected accepted drafts sum_{j<=l} a_j
  when the engine supplies it, else the realised accepted drafts; 0 for a
  round whose drafts were not verified); n_r = min(rounds, (2 - alpha) / alpha),
  the EMA's effective sample size. U_r is an upper confidence bound: a request
  is skipped only when its drafts are confidently not worth their cost, so a
  noisy but useful drafter (often 0, sometimes many) keeps drafting;
- s(n) = 1 / (n * SPS_d(n)): r's share of the drafting pass's seconds when n
  requests draft (SPS_d from the drafter's own cost table);
- Theta: the engine's output tokens per second (what the batch would have
  produced in those seconds).
Without a drafter cost table or a throughput the rule reduces to g_r >= min_gain.

A skipped request is probed: it drafts again after `probe_interval` steps; a
probe that still falls short doubles the wait (up to `max_probe_interval`); one
that clears the bar resumes drafting and resets the wait. New requests draft
for `warmup_rounds` rounds before they can be skipped, until the population
has `prior_rounds` recorded rounds: from then on a new request starts from the
population's gain (an EMA over every request's rounds) as if warmed up, so with
a drafter that helps nobody new requests skip from their first step and only
probe, and with one that helps they draft from their first step as before.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Hashable, Sequence

from .cost_table import CostTable


@dataclass
class _RequestState:
    gain: float | None = None  # EMA of tokens gained per drafted round
    gain_sq: float = 0.0  # EMA of its square (for the spread)
    rounds: int = 0  # drafted rounds recorded
    skipping: bool = False
    probing: bool = False  # drafting this step only as a probe
    next_probe: int = 0  # step at which a skipped request drafts again
    interval: int = 0  # current probe interval (steps)


class DraftSkipper:
    def __init__(self, drafter_cost_table: CostTable | None = None, min_gain: float = 0.1, margin: float = 1.0,
                 alpha: float = 0.1, z: float = 1.0, warmup_rounds: int = 3, probe_interval: int = 8,
                 max_probe_interval: int = 128, backoff: float = 2.0, throughput_alpha: float = 0.1,
                 prior_rounds: int | None = 32, prior_alpha: float = 0.05):
        if not 0.0 < alpha <= 1.0 or not 0.0 < throughput_alpha <= 1.0:
            raise ValueError("alpha and throughput_alpha must be in (0, 1]")
        if probe_interval < 1 or max_probe_interval < probe_interval or backoff < 1.0:
            raise ValueError("need 1 <= probe_interval <= max_probe_interval and backoff >= 1")
        self.drafter_cost_table = drafter_cost_table
        self.min_gain, self.margin, self.alpha, self.z = float(min_gain), float(margin), float(alpha), float(z)
        self.warmup_rounds = int(warmup_rounds)
        self.probe_interval, self.max_probe_interval, self.backoff = int(probe_interval), int(max_probe_interval), backoff
        self.throughput_alpha = throughput_alpha
        self.prior_rounds, self.prior_alpha = prior_rounds, float(prior_alpha)  # None: no population prior
        self._pop_gain = self._pop_gain_sq = 0.0  # EMA over all requests' recorded rounds
        self._pop_rounds = 0
        self.throughput: float | None = None  # EMA of engine output tokens/s (observe_step)
        self.step = 0
        self._states: dict[Hashable, _RequestState] = {}
        self._lock = threading.Lock()
        self.num_skipped = 0  # request-steps skipped so far (for metrics)
        self.num_probes = 0

    # ------------------------------------------------------------ inputs

    def observe_step(self, num_output_tokens: int, seconds: float) -> None:
        """Engine-wide output rate, one step at a time (used when select() gets no throughput)."""
        if seconds <= 0:
            return
        rate = num_output_tokens / seconds
        with self._lock:
            t = self.throughput
            self.throughput = rate if t is None else (1 - self.throughput_alpha) * t + self.throughput_alpha * rate

    def record(self, request_id: Hashable, num_accepted: int, expected_gain: float | None = None) -> None:
        """After a round in which `request_id` drafted: drafts accepted (0 if none verified), or the
        calibrated expected gain sum_{j<=l} a_j, which is preferred when given (less noisy)."""
        g = float(expected_gain) if expected_gain is not None else float(num_accepted)
        with self._lock:
            st = self._states.get(request_id)
            if st is None:
                st = self._states[request_id] = _RequestState(interval=self.probe_interval)
            if st.gain is None:
                st.gain, st.gain_sq = g, g * g
            else:
                st.gain = (1 - self.alpha) * st.gain + self.alpha * g
                st.gain_sq = (1 - self.alpha) * st.gain_sq + self.alpha * g * g
            st.rounds += 1
            a = self.prior_alpha if self._pop_rounds else 1.0
            self._pop_gain = (1 - a) * self._pop_gain + a * g
            self._pop_gain_sq = (1 - a) * self._pop_gain_sq + a * g * g
            self._pop_rounds += 1

    def _new_state(self) -> _RequestState:
        st = _RequestState(interval=self.probe_interval)
        if self.prior_rounds is not None and self._pop_rounds >= self.prior_rounds:
            st.gain, st.gain_sq, st.rounds = self._pop_gain, self._pop_gain_sq, self.warmup_rounds
        return st

    def population_gain(self) -> float | None:
        """The EMA of tokens gained per drafted round over all requests (None before any)."""
        with self._lock:
            return self._pop_gain if self._pop_rounds else None

    def forget(self, request_id: Hashable) -> None:
        """Drop a finished or aborted request's state."""
        with self._lock:
            self._states.pop(request_id, None)

    # ------------------------------------------------------------ decision

    def threshold(self, num_drafting: int, throughput: float | None = None) -> float:
        """Tokens per round a request must gain to be worth its share of the drafting pass."""
        bar = self.min_gain
        tput = self.throughput if throughput is None else throughput
        if self.drafter_cost_table is not None and tput is not None and num_drafting > 0:
            share_seconds = 1.0 / (num_drafting * self.drafter_cost_table.sps(num_drafting))
            bar = max(bar, self.margin * share_seconds * tput)
        return bar

    def select(self, request_ids: Sequence[Hashable], throughput: float | None = None) -> list[bool]:
        """Advance one step and say, per request, whether it drafts in this step."""
        with self._lock:
            self.step += 1
            states = []
            for rid in request_ids:
                st = self._states.get(rid)
                if st is None:
                    st = self._states[rid] = self._new_state()
                states.append(st)
            # The bar depends on how many share the pass: count those that would draft without new skips.
            n = sum(1 for st in states if not st.skipping or self.step >= st.next_probe) or 1
            bar = self.threshold(n, throughput)
            out = []
            for st in states:
                out.append(self._decide(st, bar))
            self.num_skipped += out.count(False)
            return out

    def upper_gain(self, st: _RequestState) -> float:
        """g + z * sd / sqrt(n_eff): the optimistic estimate of a request's gain per round."""
        n_eff = min(st.rounds, (2.0 - self.alpha) / self.alpha)
        var = max(st.gain_sq - st.gain * st.gain, 0.0)
        return st.gain + self.z * (var / max(n_eff, 1.0)) ** 0.5

    def _decide(self, st: _RequestState, bar: float) -> bool:
        if st.rounds < self.warmup_rounds or st.gain is None:
            return True
        worth_it = self.upper_gain(st) >= bar
        if st.probing:  # the probe's round has been recorded (or was lost): judge it
            st.probing = False
            if worth_it:
                st.skipping = False
                st.interval = self.probe_interval
                return True
            st.interval = min(int(st.interval * self.backoff), self.max_probe_interval)
            st.next_probe = self.step + st.interval
            return False
        if st.skipping:
            if self.step >= st.next_probe:
                st.probing = True
                self.num_probes += 1
                return True
            return False
        if not worth_it:
            st.skipping = True
            st.interval = self.probe_interval
            st.next_probe = self.step + st.interval
            return False
        return True

    def is_skipping(self, request_id: Hashable) -> bool:
        with self._lock:
            st = self._states.get(request_id)
            return bool(st and st.skipping)

    def gain(self, request_id: Hashable) -> float | None:
        with self._lock:
            st = self._states.get(request_id)
            return None if st is None else st.gain

    def __len__(self) -> int:
        return len(self._states)
