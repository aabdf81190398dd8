"""Per-user speed floors (an SLA): every request with a floor F should see at least F output
tokens per second after its first token (1 / TPOT, what a client measures as tokens/s per user).

Algorithm 1 maximises the batch's throughput; under load it gives verification budget to the most
confident drafts and the rest of the batch decodes one token per step, so the slowest users fall
below a floor first. `SpeedFloors` keeps the floors in two places, both decided from history only
(what earlier steps measured, never a token of the current draft), so output stays exact:

- the plan (`weight`): a request whose average speed so far v is below its floor F counts
  w = min(F / v, max_weight) per token in Algorithm 1's objective (`PrefixScheduler`'s
  `weights`), so its drafts rank higher and the greedy verifies more of them while the weighted
  throughput still pays for the larger forward; every weight 1: exactly Algorithm 1;
- admission (`admissions`): a waiting request is admitted only while the cost table, scaled by
  what measured steps cost (drafting, sampling, long contexts), predicts that one more request
  keeps the per-user speed at or above the tightest floor of the running requests and the
  admitted ones. Otherwise it waits in the queue, where the queue-length signal an autoscaler
  watches rises. Until a decoding step has been measured, requests with floors are admitted one at
  a time; floors that no request could reach even alone (above both the predicted single-stream
  speed and the fastest recent request) are best effort and never hold the queue.

Pure: numbers in, numbers out (the engine passes speeds, the cost table and step timings).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

# The largest floor a request may ask for (tokens/s): a bound on the field, far above any model's speed.
MAX_FLOOR = 100_000.0


@dataclass
class FloorView:
    """One running request as the floors see it."""

    floor: float  # tokens/s; 0: none
    tokens: int  # output tokens after the first
    elapsed: float  # seconds since its first token (0: no token yet)

    @property
    def speed(self) -> float | None:
        """Tokens/s after the first token so far (None before a measurable span)."""
        if self.tokens < 1 or self.elapsed <= 0.0:
            return None
        return self.tokens / self.elapsed


class SpeedFloors:
    def __init__(self, default_floor: float = 0.0, max_weight: float = 4.0, min_elapsed: float = 0.2,
                 alpha: float = 0.2, history: int = 200):
        if not (math.isfinite(default_floor) and 0.0 <= default_floor <= MAX_FLOOR):
            raise ValueError(f"the speed floor must be in [0, {MAX_FLOOR:g}] tokens/s, got {default_floor}")
        if max_weight < 1.0:
            raise ValueError("max_weight must be >= 1")
        self.default_floor = float(default_floor)
        self.max_weight = max_weight
        self.min_elapsed = min_elapsed  # seconds of decoding before a request is judged
        self.alpha = alpha
        # step model, EMAs of measured steps with decoding requests
        self.step_seconds: float | None = None  # whole step
        self.tokens_per_request: float | None = None  # output tokens per decoding request per step
        self.fed_per_request: float | None = None  # forward tokens per decoding request per step
        self.overhead: float | None = None  # measured step seconds / the cost table's seconds at its B
        # outcomes of finished requests with a floor
        self.met = 0
        self.missed = 0
        self._recent: deque[bool] = deque(maxlen=history)
        self._fastest: deque[float] = deque(maxlen=history)  # speeds of recent finished requests
        # metrics
        self.floor_draft_tokens = 0  # drafts the plan verified for requests weighted by their floor
        self.admission_holds = 0  # steps in which the floors kept a waiting request waiting
        self.below_floor = 0  # running requests below their floor at the last step

    # ------------------------------------------------------------------ per request

    def floor_of(self, requested: float | None) -> float:
        """A request's floor: its own (0 relaxes it), else the server's default."""
        return self.default_floor if requested is None else float(requested)

    def judged(self, v: FloorView) -> bool:
        """A request with a floor that has decoded long enough to be judged."""
        return v.floor > 0.0 and v.elapsed >= self.min_elapsed and v.speed is not None

    def below(self, v: FloorView) -> bool:
        return self.judged(v) and v.speed < v.floor

    def weight(self, v: FloorView) -> float:
        """How much one token of this request is worth to the plan: F / v for a request judged below
        its floor F (v its speed so far), at most `max_weight`; 1 otherwise."""
        if not self.below(v):
            return 1.0
        return min(self.max_weight, v.floor / max(v.speed, 1e-9))

    def finished(self, v: FloorView) -> None:
        """A finished request with at least two output tokens: its speed (for `solo_speed`) and, with
        a floor, met or missed."""
        if v.speed is None:
            return
        if v.floor <= 0.0:
            self._fastest.append(v.speed)
            return
        ok = v.speed >= v.floor
        self._fastest.append(v.speed)
        self.met += ok
        self.missed += not ok
        self._recent.append(ok)

    def snapshot(self) -> dict:
        """The metrics (`dspark_sla_*`)."""
        return {"sla_default_floor": self.default_floor, "sla_requests_below_floor": self.below_floor,
                "sla_requests_met": self.met, "sla_requests_missed": self.missed,
                "sla_attainment_ratio": self.attainment, "sla_floor_draft_tokens": self.floor_draft_tokens,
                "sla_admission_holds": self.admission_holds}

    @property
    def attainment(self) -> float | None:
        """Share of recent finished requests with a floor that met it (None: none yet)."""
        return sum(self._recent) / len(self._recent) if self._recent else None

    # ------------------------------------------------------------------ steps and admission

    def observe_step(self, seconds: float, decoding: int, fed: int, emitted: int, table_seconds: float | None) -> None:
        """A step with `decoding` decoding requests that fed `fed` and emitted `emitted` tokens in
        all, in `seconds`; `table_seconds`: the cost table's seconds for that many tokens."""
        if decoding <= 0 or not seconds > 0.0:
            return
        a = self.alpha

        def ema(old, new):
            return new if old is None else (1 - a) * old + a * new

        self.step_seconds = ema(self.step_seconds, seconds)
        self.tokens_per_request = ema(self.tokens_per_request, emitted / decoding)
        self.fed_per_request = ema(self.fed_per_request, fed / decoding)
        if table_seconds is not None and table_seconds > 0.0:
            self.overhead = ema(self.overhead, seconds / table_seconds)

    def predicted_speed(self, requests: int, seconds_of) -> float:
        """Tokens/s per user with `requests` decoding at once: tokens per request per step over the
        step's seconds, `seconds_of(B)` (the cost table) scaled by the measured overhead."""
        tau = self.tokens_per_request or 1.0
        fed = self.fed_per_request or 1.0
        k = self.overhead or 1.0
        return tau / (k * seconds_of(max(1.0, requests * fed)))

    def solo_speed(self, seconds_of) -> float:
        """The fastest a request could go alone: the step model's prediction for one request, or the
        fastest recent finished request if faster. The model's tokens per request and overhead are
        measured at the current load (fewer verified drafts, longer contexts), so at high load it
        underestimates a lone request; what requests actually reached does not."""
        predicted = self.predicted_speed(1, seconds_of) if seconds_of is not None else 0.0
        return max(predicted, max(self._fastest, default=0.0))

    def admissions(self, running: list[FloorView], waiting_floors: list[float], seconds_of) -> int:
        """How many of the waiting requests (their floors, in queue order) may join the `running`
        ones this step; floors count up to the server's default (none without one). `seconds_of`: the cost table's seconds of a forward of B tokens; None (no
        model): only the measured speeds so far hold the queue."""
        # a request's own floor holds the queue only up to the server's (the operator's) floor: a
        # request may ask for more speed in the plan, not make everyone else wait for it
        cap = self.default_floor
        running = [FloorView(min(v.floor, cap), v.tokens, v.elapsed) for v in running]
        waiting_floors = [min(f, cap) for f in waiting_floors]
        if seconds_of is None:
            if any(self.below(v) for v in running):
                return 0
            return len(waiting_floors)
        if self.overhead is None:  # no decoding step measured yet: one request at a time
            return 0 if running else min(1, len(waiting_floors))
        solo = self.solo_speed(seconds_of)
        floors = [v.floor for v in running if 0.0 < v.floor <= solo]
        n = 0
        for f in waiting_floors:
            if 0.0 < f <= solo:
                floors.append(f)
            # with nothing running one request is always admitted (else the queue would wait forever
            # where the model, measured under load, predicts less than a lone request reaches)
            if (running or n) and floors and self.predicted_speed(len(running) + n + 1, seconds_of) < max(floors):
                break
            n += 1
        return n
