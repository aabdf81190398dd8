"""Context lookup: drafts copied from the request's own context (prompt lookup decoding).

A generation often repeats its context: code that edits the prompt's code, a
list that reuses its own phrasing, and small models' answers that loop. When
the last n tokens of a request (prompt + output) occurred before, the tokens
that followed that earlier occurrence are a cheap draft of what comes next.
The speculative decoder offers both drafts for every request and verifies the
one with the larger expected number of accepted tokens: the DSpark drafter's
from its calibrated confidences ALONG ITS ARGMAX PATH, the lookup's from the
acceptance it has measured so far for that match length (`LookupStats`). A
copied token is a draft with all of its probability mass on one token, and the
choice reads nothing that depends on the tokens the drafter sampled, so the
target's verification keeps the output distribution exact. (Reading the
sampled draft's own confidences would not: a draft kept because its tokens
look good no longer follows the draft distribution; docs/scheduler.md and
tests/engine/test_draft_choice.py.)
"""

from __future__ import annotations

import numpy as np


def find_match(tokens, max_n: int, min_n: int, length: int) -> tuple[int, list[int]] | None:
    """The longest n in [min_n, max_n] whose last n tokens occurred earlier in `tokens`; returns
    (n, the `length` tokens that followed the most recent earlier occurrence), or None. Where that
    continuation runs into the end of `tokens` (a loop shorter than `length`), it repeats itself,
    which is what the context predicts for a loop."""
    arr = np.asarray(tokens, dtype=np.int64)
    size = arr.shape[0]
    if size < 2:
        return None
    # Candidate ends e (the continuation starts at e, e <= size - 1) whose previous token matches
    # the last one; each further n keeps those whose n-th previous token matches too.
    ends = np.flatnonzero(arr[:-1] == arr[-1]) + 1
    best, n = None, 0
    while ends.size and n < max_n:
        n += 1
        if n >= min_n:
            best = (n, int(ends[-1]))
        if n == max_n:
            break
        ends = ends[ends > n]  # room for one more token before the occurrence
        ends = ends[arr[ends - n - 1] == arr[size - n - 1]]
    if best is None:
        return None
    n, start = best
    period = size - start
    cont = arr[start:start + min(length, period)].tolist()
    while len(cont) < length:
        cont.append(cont[len(cont) - period])
    return n, cont


class TokenArrays:
    """Each request's tokens (prompt + output) as a numpy array that grows by what is new, so a
    step's lookup costs microseconds instead of converting the whole list (0.1-0.4 ms at 2-8k
    tokens) for every request."""

    def __init__(self):
        self._arrays: dict[str, tuple[np.ndarray, int]] = {}

    def get(self, key: str, tokens: list[int]) -> np.ndarray:
        buf, n = self._arrays.get(key, (None, 0))
        size = len(tokens)
        if buf is None or size < n or (n and int(buf[n - 1]) != tokens[n - 1]):
            buf, n = np.empty(max(64, 2 * size), dtype=np.int64), 0  # new, or not a prefix any more
        elif size > buf.shape[0]:
            grown = np.empty(2 * size, dtype=np.int64)
            grown[:n] = buf[:n]
            buf = grown
        if size > n:
            buf[n:size] = tokens[n:size]
        self._arrays[key] = (buf, size)
        return buf[:size]

    def forget(self, key: str) -> None:
        self._arrays.pop(key, None)


class LookupStats:
    """Measured conditional acceptance of lookup drafts per match length n and draft position k,
    separately for greedy and sampled requests (a sampled request accepts a copied token with the
    target's probability of it, a greedy one when it is the argmax). Starts from `prior` with the
    weight of `prior_weight` verified drafts, so the first lookups are tried and then judged."""

    def __init__(self, max_n: int, gamma: int, prior: float = 0.5, prior_weight: float = 2.0):
        self.gamma = gamma
        self.prior_weight = prior_weight
        self.accepted = np.full((2, max_n + 1, gamma), prior * prior_weight)
        self.judged = np.full((2, max_n + 1, gamma), prior_weight)

    def confidences(self, greedy: bool, n: int) -> np.ndarray:
        """c_k, the probability that draft k is accepted given drafts 1..k-1 were ([gamma])."""
        g = 0 if greedy else 1
        return self.accepted[g, n] / self.judged[g, n]

    def record(self, greedy: bool, n: int, num_verified: int, num_accepted: int) -> None:
        g = 0 if greedy else 1
        judged = min(num_accepted + 1, num_verified)  # positions 1..a accepted, a+1 rejected (if verified)
        self.judged[g, n, :judged] += 1
        self.accepted[g, n, :num_accepted] += 1

    def acceptance(self) -> dict:
        """{"greedy"/"sampled": {n: [c_1..c_gamma]}} for the match lengths seen so far."""
        out = {}
        for g, name in enumerate(("greedy", "sampled")):
            out[name] = {n: [round(float(x), 4) for x in self.accepted[g, n] / self.judged[g, n]]
                         for n in range(1, self.judged.shape[1]) if self.judged[g, n, 0] > self.prior_weight}
        return out


def expected_accepted(conf: np.ndarray) -> float:
    """Expected accepted drafts when all of `conf` (conditional acceptance per position) is verified."""
    return float(np.cumprod(conf).sum())


def prefer_copy(copy_conf: np.ndarray, drafter_conf: np.ndarray, cap: int) -> bool:
    """The draft-source rule: verify the copied draft where it promises more accepted tokens within
    `cap` than the drafter. Lossless only when both confidences were fixed before any draft token
    was sampled (the drafter's along its argmax path; see docs/scheduler.md)."""
    return expected_accepted(copy_conf[:cap]) > expected_accepted(drafter_conf[:cap])
