"""The acceptance log: one writer, one reader, drafter and context-lookup rounds kept apart."""

from __future__ import annotations

import numpy as np

from dspark_serve.engine.acceptance_log import AcceptanceLogWriter, read_rounds


def test_rounds_round_trip(tmp_path):
    path = tmp_path / "rounds.jsonl"
    log = AcceptanceLogWriter(path)
    log.drafter_round([0.5, -1.0, 2.0], verified=3, accepted=1)
    log.lookup_round(4, verified=5, accepted=5)
    log.drafter_round([1.5], verified=1, accepted=0)
    log.close()
    AcceptanceLogWriter(path).close()  # appends, never truncates
    r = read_rounds(path)
    assert r.gamma == 3
    np.testing.assert_array_equal(r.logits, [[0.5, -1.0, 2.0], [1.5, 0.0, 0.0]])  # zero-padded
    assert r.verified.tolist() == [3, 1] and r.accepted.tolist() == [1, 0]
    assert r.lookup_verified.tolist() == [5] and r.lookup_accepted.tolist() == [5]


def test_an_empty_log_has_no_rounds(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    r = read_rounds(path)
    assert r.logits.shape == (0, 0) and len(r.verified) == 0 and len(r.lookup_verified) == 0
