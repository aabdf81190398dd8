"""The machine's throughput curve SPS(B): forward steps per second with B tokens in the forward.

The prefix scheduler trades expected accepted tokens against the slowdown of a
larger verification forward, so it needs SPS(B) for every B it might choose.
A `CostTable` holds measured points (B, steps/s), interpolates linearly
between them and holds the end values beyond the first and last point. It is
profiled at start-up (`profile_cost_table`), saved to / loaded from a JSON
file keyed by model, dtype, device and threads, and refreshed from live step
timings (`observe`).
"""

from __future__ import annotations

import bisect
import json
import math
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Mapping

FORMAT = "dspark-cost-table"
VERSION = 1
KEY_FIELDS = ("model", "dtype", "device", "threads")


def _interpolate(xs: list[float], ys: list[float], num_tokens: float) -> float:
    """Linear between points, held at the ends."""
    b = float(num_tokens)
    if b <= xs[0]:
        return ys[0]
    if b >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, b)  # xs[i-1] <= b < xs[i]
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (b - x0) / (x1 - x0)


class CostTable:
    """SPS(B) as a piecewise-linear curve over measured points (B ascending)."""

    def __init__(self, points: Mapping[float, float], alpha: float = 0.1, spread: float = 0.0,
                 draft: Mapping[float, float] | None = None):
        if not points:
            raise ValueError("a cost table needs at least one (B, steps_per_second) point")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        items = sorted((float(b), float(s)) for b, s in points.items())
        for b, s in items:
            if not (math.isfinite(b) and b > 0):
                raise ValueError(f"token counts must be positive and finite, got {b}")
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"steps per second must be positive and finite, got {s} at B={b}")
        if not (spread >= 0.0 and math.isfinite(spread)):
            raise ValueError(f"spread must be >= 0, got {spread}")
        self.alpha = float(alpha)
        # observe(): how far (in ln B) a timing also moves the neighbouring buckets; 0: only its own.
        self.spread = float(spread)
        self._xs = [b for b, _ in items]
        self._ys = [s for _, s in items]
        self._start = list(self._ys)  # the shape `spread` keeps (the values given at construction)
        # The drafting pass's seconds by the sequences it drafts for ({} when not profiled): what
        # the draft budget's forecast charges a step for drafting before it has drafted.
        self._draft: dict[float, float] = {}
        for n, sec in (draft or {}).items():
            if not (float(n) > 0 and math.isfinite(float(n)) and float(sec) > 0 and math.isfinite(float(sec))):
                raise ValueError(f"draft seconds need positive sequences and seconds, got {n}: {sec}")
            self._draft[float(n)] = float(sec)
        # One writer (the engine thread calling observe) and any number of readers:
        # observe replaces floats in place (one bucket, or every bucket with a spread); the lock keeps
        # save/points consistent, and a reader between two replacements sees a mix of two valid tables.
        self._lock = threading.Lock()

    # ------------------------------------------------------------ construction

    @classmethod
    def from_points(cls, points: Mapping[float, float], alpha: float = 0.1, spread: float = 0.0,
                    draft: Mapping[float, float] | None = None) -> "CostTable":
        """The table through `points` = {B: steps_per_second}, used as given."""
        return cls(points, alpha=alpha, spread=spread, draft=draft)

    @classmethod
    def constant(cls, steps_per_second: float = 1.0) -> "CostTable":
        """A flat curve: every B costs the same (useful in tests and as a placeholder)."""
        return cls({1: steps_per_second})

    def copy(self) -> "CostTable":
        return CostTable(self.points, alpha=self.alpha, spread=self.spread, draft=self.draft_points)

    # ------------------------------------------------------------ queries

    @property
    def points(self) -> dict[float, float]:
        """A snapshot {B: steps_per_second}, B ascending."""
        with self._lock:
            return dict(zip(self._xs, self._ys))

    @property
    def max_tokens(self) -> float:
        return self._xs[-1]

    def sps(self, num_tokens: float) -> float:
        """Steps per second with `num_tokens` tokens in the forward (linear between points, held at the ends)."""
        return _interpolate(self._xs, self._ys, num_tokens)

    __call__ = sps

    def profiled_sps(self, num_tokens: float) -> float:
        """SPS at `num_tokens` as given at construction (the profile), before any live refresh: its
        SHAPE stays right when the machine's speed drifts, while live steps refresh only the buckets
        they visit."""
        return _interpolate(self._xs, self._start, num_tokens)

    def seconds(self, num_tokens: float) -> float:
        """Seconds per step at `num_tokens` (1 / SPS)."""
        return 1.0 / self.sps(num_tokens)

    # ------------------------------------------------------------ the drafting pass

    @property
    def draft_points(self) -> dict[float, float]:
        """A snapshot {sequences: drafting seconds}, empty when the drafting pass was not profiled."""
        with self._lock:
            return dict(sorted(self._draft.items()))

    def draft_seconds(self, num_seqs: float) -> float | None:
        """Seconds of one drafting pass for `num_seqs` sequences: linear between the profiled points,
        the first point's below them and proportional to the sequences beyond the last (the pass is
        a batch of `num_seqs` blocks); None when the pass was not profiled."""
        with self._lock:
            if not self._draft:
                return None
            xs = sorted(self._draft)
            ys = [self._draft[x] for x in xs]
        if num_seqs > xs[-1]:
            return ys[-1] * num_seqs / xs[-1]
        return _interpolate(xs, ys, num_seqs)

    def observe_draft(self, num_seqs: float, seconds: float) -> None:
        """Fold a live drafting pass's seconds into the nearest profiled point (EMA, `alpha`), when
        it is within a factor 4/3 of it in sequences."""
        if not (seconds > 0 and math.isfinite(seconds)) or not num_seqs > 0:
            return
        with self._lock:
            if not self._draft:
                return
            n = min(self._draft, key=lambda x: abs(math.log(x / num_seqs)))
            if abs(math.log(n / num_seqs)) <= math.log(4 / 3):
                self._draft[n] = (1.0 - self.alpha) * self._draft[n] + self.alpha * seconds

    # ------------------------------------------------------------ cleaning / refresh

    def smoothed(self) -> "CostTable":
        """A copy made monotone non-increasing in B (pool-adjacent-violators, equal weights).

        A larger forward is never faster in expectation; measurement noise that
        says otherwise would make the scheduler chase phantom sweet spots.
        """
        xs, ys = self._xs, list(self._ys)
        # Each block: [sum, count]; merge while a later block's mean exceeds an earlier one's.
        blocks: list[list[float]] = []
        for y in ys:
            blocks.append([y, 1.0])
            while len(blocks) > 1 and blocks[-1][0] / blocks[-1][1] > blocks[-2][0] / blocks[-2][1]:
                s, n = blocks.pop()
                blocks[-1][0] += s
                blocks[-1][1] += n
        fitted: list[float] = []
        for s, n in blocks:
            fitted.extend([s / n] * int(n))
        # Pooled means can differ from their neighbours by rounding in the last bit; force the order.
        for i in range(1, len(fitted)):
            fitted[i] = min(fitted[i], fitted[i - 1])
        return CostTable(dict(zip(xs, fitted)), alpha=self.alpha, spread=self.spread, draft=self.draft_points)

    def replace(self, other: "CostTable") -> None:
        """Take `other`'s points in place (every holder of this table sees them): a re-profile after
        the step got faster, e.g. once its compiled graphs are ready."""
        with self._lock:
            self._xs, self._ys, self._start = list(other._xs), list(other._ys), list(other._start)
            self._draft = other.draft_points

    def nearest_bucket(self, num_tokens: float) -> float:
        """The measured B closest to `num_tokens` (the smaller one on a tie)."""
        xs = self._xs
        i = bisect.bisect_left(xs, float(num_tokens))
        if i == 0:
            return xs[0]
        if i == len(xs):
            return xs[-1]
        lo, hi = xs[i - 1], xs[i]
        return lo if num_tokens - lo <= hi - num_tokens else hi

    def observe(self, num_tokens: float, seconds: float) -> None:
        """Fold one live step timing into the nearest bucket: sps <- (1-alpha) sps + alpha / seconds.

        With `spread` > 0 the other buckets move too, each towards its start-up value scaled by
        what this timing says of the machine: r = (1 / seconds) / start_b, and bucket k goes to
        (1 - alpha w) sps_k + alpha w r start_k with w = exp(-|ln B_k - ln B_b| / spread). Live
        steps visit only a few B (a plain step and a fully drafted one, say); without the spread
        the buckets between them keep their start-up values, and a table whose visited buckets
        followed the machine while its middle did not is jagged, which an early-stopping
        scheduler reads as a cliff. With it, an unvisited bucket tracks the same drift as its
        visited neighbours and keeps the shape the profile measured."""
        if not (seconds > 0 and math.isfinite(seconds)) or not (num_tokens > 0):
            return
        b = self.nearest_bucket(num_tokens)
        i = bisect.bisect_left(self._xs, b)
        with self._lock:
            old = self._ys[i]
            self._ys[i] = (1.0 - self.alpha) * old + self.alpha / seconds
            if self.spread > 0.0:
                r = 1.0 / (seconds * self._start[i])
                lb = math.log(b)
                for k, x in enumerate(self._xs):
                    if k != i:
                        w = self.alpha * math.exp(-abs(math.log(x) - lb) / self.spread)
                        self._ys[k] = (1.0 - w) * self._ys[k] + w * r * self._start[k]

    # ------------------------------------------------------------ files

    def to_dict(self, key: Mapping | None = None) -> dict:
        with self._lock:
            pts = [[b, s] for b, s in zip(self._xs, self._ys)]
            draft = [[n, sec] for n, sec in sorted(self._draft.items())]
        d = {"format": FORMAT, "version": VERSION, "alpha": self.alpha, "points": pts}
        if draft:
            d["draft"] = draft
        if key is not None:
            d["key"] = _normalise_key(key)
        return d

    def save(self, path: str | os.PathLike, key: Mapping) -> None:
        """Write the table as JSON with its `key` (model, dtype, device, threads), atomically."""
        missing = [f for f in KEY_FIELDS if f not in key]
        if missing:
            raise ValueError(f"cost table key is missing {missing}; it needs {list(KEY_FIELDS)}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(self.to_dict(key), indent=1) + "\n")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, key: Mapping) -> "CostTable | None":
        """The table saved at `path` if its key equals `key`; None if the file is absent or the key differs.

        A file that exists but is not a cost table raises ValueError (a typo
        should not silently trigger a re-profile).
        """
        path = Path(path)
        if not path.exists():
            return None
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a JSON cost table ({e})") from None
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file")
        if d.get("version") != VERSION:
            raise ValueError(f"{path}: cost table version {d.get('version')} is not supported (expected {VERSION})")
        if d.get("key") != _normalise_key(key):
            return None
        try:
            points = {float(b): float(s) for b, s in d["points"]}
            draft = {float(n): float(sec) for n, sec in d.get("draft", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: malformed points ({e})") from None
        return cls(points, alpha=float(d.get("alpha", 0.1)), draft=draft)

    def __repr__(self) -> str:
        pts = ", ".join(f"{b:g}: {s:.4g}" for b, s in self.points.items())
        return f"CostTable({{{pts}}})"


def _normalise_key(key: Mapping) -> dict:
    # What comparing against a JSON file sees (tuples become lists, ints stay ints).
    return json.loads(json.dumps(dict(key), sort_keys=True, default=str))


# ---------------------------------------------------------------- profiling


def default_grid(max_tokens: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x between), ending at max_tokens."""
    if max_tokens < 1:
        raise ValueError("max_tokens must be >= 1")
    grid = {1, 2, 3}
    p = 4
    while p <= max_tokens:
        grid.add(p)
        grid.add(p * 3 // 2)
        p *= 2
    grid = {b for b in grid if b <= max_tokens}
    grid.add(int(max_tokens))
    return sorted(grid)


def profile_cost_table(
    run: Callable[[int], float | None],
    max_tokens: int | None = None,
    grid: list[int] | None = None,
    repeats: int = 3,
    warmup: int = 1,
    alpha: float = 0.1,
    smooth: bool = False,
) -> CostTable:
    """Measure SPS at each grid point with `run(B)` and return the table.

    `run(B)` performs one forward of B tokens (the engine supplies a real one)
    and returns its duration in seconds; if it returns None it is timed here
    with a monotonic clock (the callable must then synchronise the device
    itself). Each point is the median of `repeats` runs after `warmup` untimed
    ones (the first forward pays for allocation and kernel selection).
    """
    if grid is None:
        if max_tokens is None:
            raise ValueError("give max_tokens or an explicit grid")
        grid = default_grid(max_tokens)
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    points = {}
    for b in grid:
        for _ in range(warmup):
            run(b)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            s = run(b)
            if s is None:
                s = time.perf_counter() - t0
            times.append(float(s))
        med = statistics.median(times)
        if not med > 0:
            raise ValueError(f"run({b}) reported a non-positive duration {med}")
        points[b] = 1.0 / med
    table = CostTable(points, alpha=alpha)
    return table.smoothed() if smooth else table
