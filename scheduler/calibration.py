"""Confidence calibration: Sequential Temperature Scaling (STS) of the drafter's confidence head.

The scheduler ranks drafts by prefix survival a_k = prod_{i<=k} c_i, so what
must be calibrated is a_k, not each c_k in isolation. STS (REFERENCE.md
section 3) fits one temperature per position, c_k = sigmoid(logit_k / T_k),
left to right: T_k minimises the Expected Calibration Error of a_k with
T_1..T_{k-1} already fixed. Positive temperatures keep every position's order.

Outcome semantics of one verification round with l drafts verified and m of
them accepted (m <= l, the first rejection stops the round):
- a_k is observed iff k <= l; its label is [m >= k] ("drafts 1..k all accepted").
- c_k (conditional) is observed iff k <= l and m >= k - 1; its label is [m >= k].
Positions beyond l are never used, even when an earlier rejection makes their
label certain: whether k <= l was decided from the confidences (the scheduler
is non-anticipating), so filtering on k <= l keeps the sample unbiased, while
adding "certain zeros" only from rejected rounds would not.
"""

from __future__ import annotations

import json
import math
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

FORMAT = "dspark-sts-calibration"
VERSION = 1


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for large |x|


def _bin_index(pred: np.ndarray, bins: int) -> np.ndarray:
    return np.clip((pred * bins).astype(np.int64), 0, bins - 1)


def ece(pred, outcome, bins: int = 15) -> float:
    """Expected Calibration Error: sum over equal-width bins of (n_b / N) |mean pred - mean outcome|."""
    p = _np(pred).ravel()
    y = _np(outcome).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} outcomes")
    if p.size == 0:
        return float("nan")
    idx = _bin_index(p, bins)
    sp = np.bincount(idx, weights=p, minlength=bins)
    sy = np.bincount(idx, weights=y, minlength=bins)
    return float(np.abs(sp - sy).sum() / p.size)


def reliability(pred, outcome, bins: int = 15) -> dict:
    """Reliability-diagram data per equal-width bin: mean confidence, accuracy and count (None where empty)."""
    p = _np(pred).ravel()
    y = _np(outcome).ravel()
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions for {y.size} outcomes")
    idx = _bin_index(p, bins)
    n = np.bincount(idx, minlength=bins)
    sp = np.bincount(idx, weights=p, minlength=bins)
    sy = np.bincount(idx, weights=y, minlength=bins)
    conf = [float(sp[b] / n[b]) if n[b] else None for b in range(bins)]
    acc = [float(sy[b] / n[b]) if n[b] else None for b in range(bins)]
    return {
        "lower": [b / bins for b in range(bins)],
        "upper": [(b + 1) / bins for b in range(bins)],
        "confidence": conf,
        "accuracy": acc,
        "count": [int(c) for c in n],
        "ece": ece(p, y, bins) if p.size else None,
    }


def _ece_rows(preds: np.ndarray, y: np.ndarray, bins: int) -> np.ndarray:
    """ECE of every row of preds [G, n] against the same outcomes y [n], in one pass."""
    G, n = preds.shape
    idx = _bin_index(preds, bins) + (np.arange(G) * bins)[:, None]
    flat = idx.ravel()
    sp = np.bincount(flat, weights=preds.ravel(), minlength=G * bins)
    sy = np.bincount(flat, weights=np.broadcast_to(y, preds.shape).ravel(), minlength=G * bins)
    return np.abs(sp - sy).reshape(G, bins).sum(axis=1) / n


# Log-spaced temperatures from 1/8 to 8 (includes 1.0), then a finer local pass.
DEFAULT_GRID = tuple(float(t) for t in np.exp(np.linspace(math.log(0.125), math.log(8.0), 49)))


def positions_from_rounds(logits, num_accepted, num_verified=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per position k: (logits 1..k of rounds where a_k was observed [n_k, k], labels [m >= k] [n_k])."""
    L = _np(logits)
    if L.ndim != 2:
        raise ValueError("logits must be [rounds, gamma]")
    N, gamma = L.shape
    m = _np(num_accepted).astype(np.int64).ravel()
    v = np.full(N, gamma, dtype=np.int64) if num_verified is None else _np(num_verified).astype(np.int64).ravel()
    if m.size != N or v.size != N:
        raise ValueError("num_accepted / num_verified need one entry per round")
    if np.any(m > v) or np.any(m < 0):
        raise ValueError("need 0 <= num_accepted <= num_verified for every round")
    out = []
    for k in range(1, gamma + 1):
        obs = v >= k
        out.append((L[obs, :k], (m[obs] >= k).astype(np.float64)))
    return out


class STSCalibrator:
    """Per-position temperatures T_1..T_gamma; calibrated c_k = sigmoid(logit_k / T_k)."""

    def __init__(self, temperatures: Sequence[float] | None = None, bins: int = 15):
        self.temperatures = [float(t) for t in (temperatures or [])]
        if any(not (t > 0 and math.isfinite(t)) for t in self.temperatures):
            raise ValueError("temperatures must be positive and finite")
        self.bins = bins
        self.ece_before: list[float | None] = []
        self.ece_after: list[float | None] = []
        self.num_samples: list[int] = []

    # ------------------------------------------------------------ fitting

    def fit(self, logits, num_accepted, num_verified=None, grid: Sequence[float] = DEFAULT_GRID,
            min_samples: int = 50) -> "STSCalibrator":
        """Fit on held-out rounds: logits [N, gamma], accepted drafts per round, verified drafts (default gamma)."""
        return self.fit_positions(positions_from_rounds(logits, num_accepted, num_verified), grid, min_samples)

    def fit_positions(self, per_position, grid: Sequence[float] = DEFAULT_GRID, min_samples: int = 50) -> "STSCalibrator":
        """Fit from per-position data [(logits 1..k [n_k, k], labels of a_k [n_k]), k = 1..gamma].

        A position with fewer than `min_samples` observations keeps the previous
        position's temperature (1.0 for the first).
        """
        grid_arr = np.asarray(sorted(set(float(t) for t in grid) | {1.0}))
        temps: list[float] = []
        before, after, counts = [], [], []
        for k, (Lk, yk) in enumerate(per_position, start=1):
            Lk = np.asarray(Lk, dtype=np.float64).reshape(-1, k)
            yk = np.asarray(yk, dtype=np.float64).ravel()
            n = yk.size
            counts.append(int(n))
            prev_T = temps[-1] if temps else 1.0
            if n == 0:
                temps.append(prev_T)
                before.append(None)
                after.append(None)
                continue
            raw_a = np.prod(_sigmoid(Lk), axis=1)
            before.append(ece(raw_a, yk, self.bins))
            a_prev = np.ones(n)
            for i, t in enumerate(temps):
                a_prev = a_prev * _sigmoid(Lk[:, i] / t)
            lk = Lk[:, k - 1]
            if n < min_samples:
                T = prev_T
            else:
                T = self._search(lk, a_prev, yk, grid_arr)
            temps.append(T)
            after.append(ece(a_prev * _sigmoid(lk / T), yk, self.bins))
        self.temperatures = temps
        self.ece_before, self.ece_after, self.num_samples = before, after, counts
        return self

    def _search(self, lk, a_prev, y, grid_arr) -> float:
        def scores(ts):
            preds = a_prev[None, :] * _sigmoid(lk[None, :] / ts[:, None])
            return _ece_rows(preds, y, self.bins)

        s = scores(grid_arr)
        i = int(np.argmin(s))
        # Refine between the neighbours of the coarse optimum (log scale).
        lo = grid_arr[max(i - 1, 0)]
        hi = grid_arr[min(i + 1, len(grid_arr) - 1)]
        fine = np.exp(np.linspace(math.log(lo), math.log(hi), 17))
        sf = scores(fine)
        j = int(np.argmin(sf))
        return float(fine[j]) if sf[j] < s[i] else float(grid_arr[i])

    # ------------------------------------------------------------ applying

    def temperature(self, k: int) -> float:
        """T for 1-based position k (positions past the fitted ones reuse the last T; 1.0 if unfitted)."""
        if not self.temperatures:
            return 1.0
        return self.temperatures[min(k, len(self.temperatures)) - 1]

    def _temps_for(self, gamma: int) -> list[float]:
        return [self.temperature(k) for k in range(1, gamma + 1)]

    def apply(self, logits):
        """Calibrated conditional confidences sigmoid(logit_k / T_k) for [..., gamma] logits.

        Torch tensors come back as tensors (same device and dtype), numpy arrays
        as arrays, lists as lists.
        """
        if hasattr(logits, "detach"):  # torch, imported lazily: the scheduler stays importable without it
            import torch

            if logits.shape[-1] == 0:
                return torch.sigmoid(logits)
            t = torch.tensor(self._temps_for(logits.shape[-1]), dtype=logits.dtype, device=logits.device)
            return torch.sigmoid(logits / t)
        arr = np.asarray(logits, dtype=np.float64)
        if arr.shape[-1:] == (0,):
            out = arr
        else:
            out = _sigmoid(arr / np.asarray(self._temps_for(arr.shape[-1])))
        return out.tolist() if not isinstance(logits, np.ndarray) else out

    def apply_probs(self, confidences, eps: float = 1e-7):
        """Calibrate confidences that are already probabilities (logit recovered as log(c / (1 - c)))."""
        if hasattr(confidences, "detach"):
            import torch

            c = confidences.clamp(eps, 1 - eps)
            return self.apply(torch.log(c) - torch.log1p(-c))
        c = np.clip(np.asarray(confidences, dtype=np.float64), eps, 1 - eps)
        out = self.apply(np.log(c) - np.log1p(-c))
        return out.tolist() if not isinstance(confidences, np.ndarray) else out

    def cumulative(self, logits) -> np.ndarray:
        """Calibrated prefix survival a_k for [N, gamma] logits (numpy)."""
        return np.cumprod(np.asarray(self.apply(np.asarray(_np(logits))), dtype=np.float64), axis=-1)

    # ------------------------------------------------------------ files

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "method": "sequential_temperature_scaling",
            "bins": self.bins,
            "temperatures": list(self.temperatures),
            "ece_before": list(self.ece_before),
            "ece_after": list(self.ece_after),
            "num_samples": list(self.num_samples),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "STSCalibrator":
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        if d.get("version") != VERSION:
            raise ValueError(f"calibration version {d.get('version')} is not supported (expected {VERSION})")
        cal = cls(d["temperatures"], bins=int(d.get("bins", 15)))
        cal.ece_before = list(d.get("ece_before", []))
        cal.ece_after = list(d.get("ece_after", []))
        cal.num_samples = list(d.get("num_samples", []))
        return cal

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        """The calibration as JSON text; also written (atomically) to `path` when given (conventionally calibration.json)."""
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        if path is not None:
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_text(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, source: str | os.PathLike) -> "STSCalibrator":
        """Load from a path to calibration.json or from JSON text."""
        if isinstance(source, str) and source.lstrip().startswith("{"):
            text = source
        else:
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        return f"STSCalibrator(temperatures={[round(t, 3) for t in self.temperatures]})"


class OnlineCalibrator:
    """STS refitted from live verification rounds, with bounded memory.

    One ring buffer per position k holds the `capacity` most recent rounds in
    which a_k was observed (k <= verified): their logits 1..k and the label
    [accepted >= k]. Every `refit_every` recorded rounds the temperatures are
    refitted on the buffers (in the caller's thread, or in a background
    thread with background=True). Safe to call from several threads.
    """

    def __init__(self, gamma: int, capacity: int = 4096, refit_every: int = 1024, min_samples: int = 200,
                 bins: int = 15, grid: Sequence[float] = DEFAULT_GRID, initial: STSCalibrator | None = None,
                 background: bool = False):
        if gamma < 1 or capacity < 1 or refit_every < 1:
            raise ValueError("gamma, capacity and refit_every must be >= 1")
        self.gamma, self.capacity, self.refit_every = gamma, capacity, refit_every
        self.min_samples, self.bins, self.grid, self.background = min_samples, bins, tuple(grid), background
        self._logits = [np.zeros((capacity, k), dtype=np.float32) for k in range(1, gamma + 1)]
        self._labels = [np.zeros(capacity, dtype=np.float32) for _ in range(gamma)]
        self._count = [0] * gamma  # valid entries (<= capacity)
        self._next = [0] * gamma  # ring write position
        self._since_fit = 0
        self.num_recorded = 0
        self.num_fits = 0
        self._lock = threading.Lock()  # buffers and the current calibrator
        self._fit_lock = threading.Lock()  # one refit at a time
        self._start_lock = threading.Lock()  # one background refit thread started at a time
        self._calibrator = initial or STSCalibrator(bins=bins)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ recording

    def record(self, logits, num_verified: int, num_accepted: int) -> None:
        """One round of one request: its gamma confidence logits, drafts verified, drafts accepted."""
        row = _np(logits).ravel()
        v = min(int(num_verified), self.gamma, row.size)
        m = int(num_accepted)
        if m < 0 or m > int(num_verified):
            raise ValueError(f"need 0 <= num_accepted ({m}) <= num_verified ({num_verified})")
        with self._lock:
            for k in range(1, v + 1):
                i = self._next[k - 1]
                self._logits[k - 1][i] = row[:k]
                self._labels[k - 1][i] = 1.0 if m >= k else 0.0
                self._next[k - 1] = (i + 1) % self.capacity
                self._count[k - 1] = min(self._count[k - 1] + 1, self.capacity)
            self.num_recorded += 1
            self._since_fit += 1
            due = self._since_fit >= self.refit_every
            if due:
                self._since_fit = 0
        if due:
            if self.background:
                self._start_background_refit()
            else:
                self.refit()

    def record_batch(self, logits, num_verified: Sequence[int], num_accepted: Sequence[int]) -> None:
        """Many rounds at once: logits [R, gamma] (tensor, array or lists)."""
        L = _np(logits)
        for r in range(L.shape[0]):
            self.record(L[r], int(num_verified[r]), int(num_accepted[r]))

    # ------------------------------------------------------------ fitting

    def _snapshot(self) -> list[tuple[np.ndarray, np.ndarray]]:
        with self._lock:
            return [(self._logits[k][: self._count[k]].astype(np.float64),
                     self._labels[k][: self._count[k]].astype(np.float64)) for k in range(self.gamma)]

    def refit(self) -> STSCalibrator | None:
        """Refit now on the buffered rounds; returns the new calibrator (None if another refit is running)."""
        if not self._fit_lock.acquire(blocking=False):
            return None
        try:
            data = self._snapshot()
            if not data[0][1].size:
                return None
            cal = STSCalibrator(bins=self.bins).fit_positions(data, self.grid, self.min_samples)
            with self._lock:
                self._calibrator = cal
                self.num_fits += 1
            return cal
        finally:
            self._fit_lock.release()

    def _start_background_refit(self) -> None:
        with self._start_lock:  # recorders in several threads: one refit thread at a time
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self.refit, name="sts-refit", daemon=True)
            self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a background refit to finish (and for any refit still holding the fit lock)."""
        t = self._thread
        if t is not None:
            t.join(timeout)
        if self._fit_lock.acquire(timeout=-1 if timeout is None else timeout):
            self._fit_lock.release()

    # ------------------------------------------------------------ reading

    @property
    def calibrator(self) -> STSCalibrator:
        with self._lock:
            return self._calibrator

    @property
    def temperatures(self) -> list[float]:
        cal = self.calibrator
        return [cal.temperature(k) for k in range(1, self.gamma + 1)]

    def apply(self, logits):
        return self.calibrator.apply(logits)

    def buffered(self) -> list[int]:
        """Observations held per position (each <= capacity)."""
        with self._lock:
            return list(self._count)

    def ece_by_position(self) -> dict:
        """ECE of a_k per position on the current buffers, raw (T = 1) and calibrated."""
        data = self._snapshot()
        cal = self.calibrator
        before, after = [], []
        for k, (Lk, yk) in enumerate(data, start=1):
            if not yk.size:
                before.append(None)
                after.append(None)
                continue
            before.append(ece(np.prod(_sigmoid(Lk), axis=1), yk, self.bins))
            temps = np.asarray(cal._temps_for(k))
            after.append(ece(np.prod(_sigmoid(Lk / temps), axis=1), yk, self.bins))
        return {"before": before, "after": after, "count": [int(y.size) for _, y in data]}

    def reliability(self, k: int, calibrated: bool = True) -> dict:
        """Reliability-diagram data of a_k (1-based position) on the current buffer."""
        if not 1 <= k <= self.gamma:
            raise ValueError(f"position {k} outside 1..{self.gamma}")
        Lk, yk = self._snapshot()[k - 1]
        temps = np.asarray(self.calibrator._temps_for(k)) if calibrated else np.ones(k)
        return reliability(np.prod(_sigmoid(Lk / temps), axis=1) if yk.size else np.zeros(0), yk, self.bins)

    def stats(self) -> dict:
        """Everything the server publishes: temperatures, per-position ECE before/after, counts, fits."""
        e = self.ece_by_position()
        return {
            "temperatures": self.temperatures,
            "ece_before": e["before"],
            "ece_after": e["after"],
            "buffered": e["count"],
            "num_recorded": self.num_recorded,
            "num_fits": self.num_fits,
        }
