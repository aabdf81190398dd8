"""The acceptance log (`--record-acceptance FILE`): one JSON line per verification round.

A drafter round: {"logits": [confidence logits c_1..c_gamma], "verified": l, "accepted": a};
a round whose draft was copied from the context (context lookup): {"lookup": n, "verified": l,
"accepted": a} (no drafter confidences). The engine writes it (`SpeculativeDecoder.record_round`);
`dspark calibrate` fits STS temperatures from it and `dspark eval-drafter` measures tau with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class AcceptanceLogWriter:
    def __init__(self, path: str | Path):
        self._f = open(path, "a", buffering=1)

    def drafter_round(self, logits: list[float], verified: int, accepted: int) -> None:
        self._f.write(json.dumps({"logits": logits, "verified": verified, "accepted": accepted}) + "\n")

    def lookup_round(self, match_len: int, verified: int, accepted: int) -> None:
        self._f.write(json.dumps({"lookup": match_len, "verified": verified, "accepted": accepted}) + "\n")

    def close(self) -> None:
        self._f.close()


@dataclass
class Rounds:
    """A log's rounds: the drafter's (confidence logits [n, gamma], zero-padded past each round's
    own length, and verified / accepted counts) and context lookup's (counts only)."""

    logits: np.ndarray
    verified: np.ndarray
    accepted: np.ndarray
    lookup_verified: np.ndarray
    lookup_accepted: np.ndarray

    @property
    def gamma(self) -> int:
        return self.logits.shape[1]


def read_rounds(path: str | Path) -> Rounds:
    drafter, lookup = [], []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                (lookup if r.get("lookup") else drafter).append(r)
    gamma = max((len(r["logits"]) for r in drafter), default=0)
    logits = np.zeros((len(drafter), gamma), dtype=np.float64)
    for i, r in enumerate(drafter):
        logits[i, :len(r["logits"])] = r["logits"]

    def counts(rows, key):
        return np.array([r[key] for r in rows], dtype=np.int64)

    return Rounds(logits, counts(drafter, "verified"), counts(drafter, "accepted"),
                  counts(lookup, "verified"), counts(lookup, "accepted"))
