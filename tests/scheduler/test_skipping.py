"""DraftSkipper: useless drafts are skipped (and probed), useful ones never are."""

from __future__ import annotations

import random

import pytest

from dspark_serve.scheduler import CostTable, DraftSkipper


def run(skipper, rid, accepted_fn, steps):
    """Drive one request: returns the steps (1-based) at which it drafted."""
    drafted = []
    for step in range(1, steps + 1):
        (d,) = skipper.select([rid])
        if d:
            drafted.append(step)
            skipper.record(rid, accepted_fn(step))
    return drafted


def test_useless_drafter_is_skipped_after_warmup_and_probed_with_backoff():
    s = DraftSkipper(warmup_rounds=3, probe_interval=8, max_probe_interval=32, backoff=2.0)
    drafted = run(s, "r", lambda step: 0, 200)
    # 3 warm-up rounds, skip decided at step 4 (next probe at 4 + 8 = 12), the probe fails
    # (judged at 13, wait 16 -> 29), then 29 -> 30 + 32 = 62, capped at 32 from then on.
    assert drafted[:3] == [1, 2, 3]
    assert drafted[3:6] == [12, 29, 62]
    gaps = [b - a for a, b in zip(drafted[3:], drafted[4:])]
    assert gaps[:2] == [17, 33] and all(g == 33 for g in gaps[2:])
    assert len(drafted) < 12  # vs 200 without skipping
    assert s.is_skipping("r") and s.num_probes == len(drafted) - 3


def test_good_drafter_is_never_skipped():
    rng = random.Random(0)
    s = DraftSkipper()
    drafted = run(s, "g", lambda step: rng.choice([1, 2, 3, 4, 5, 6]), 300)
    assert len(drafted) == 300 and not s.is_skipping("g")


def test_a_noisy_but_useful_drafter_is_not_skipped():
    rng = random.Random(1)
    s = DraftSkipper(min_gain=0.1)
    # accepts nothing 70% of the time, 3 tokens otherwise: mean gain 0.9 per round
    drafted = run(s, "n", lambda step: 3 if rng.random() < 0.3 else 0, 300)
    assert len(drafted) > 250


def test_a_skipped_request_resumes_when_a_probe_succeeds():
    s = DraftSkipper(warmup_rounds=2, probe_interval=4, alpha=0.5)
    drafted = run(s, "x", lambda step: 0 if step < 20 else 5, 80)
    late = [d for d in drafted if d >= 40]
    assert late == list(range(40, 81))[: len(late)] and len(late) == 41  # drafting every step again
    assert not s.is_skipping("x")


def test_expected_gain_is_preferred_over_the_realised_count():
    s = DraftSkipper(warmup_rounds=1, min_gain=0.5)
    s.select(["e"])
    s.record("e", num_accepted=0, expected_gain=2.0)  # unlucky round, good expectation
    assert s.select(["e"]) == [True]
    assert s.gain("e") == 2.0


def test_drafting_cost_share_sets_the_bar():
    # Drafter: 100 steps/s with 1 request, 50 steps/s with 4 (share = 1 / (4 * 50) = 5 ms each).
    drafter = CostTable.from_points({1: 100.0, 4: 50.0})
    s = DraftSkipper(drafter_cost_table=drafter, min_gain=0.05, warmup_rounds=1)
    # engine makes 200 tokens/s: 5 ms of drafting costs 1 token of output
    assert s.threshold(4, throughput=200.0) == pytest.approx(1.0)
    assert s.threshold(4) == 0.05  # no throughput known yet -> only min_gain
    s.observe_step(num_output_tokens=20, seconds=0.1)
    assert s.throughput == pytest.approx(200.0) and s.threshold(4) == pytest.approx(1.0)
    ids = ["a", "b", "c", "d"]
    s.select(ids)
    for rid, gain in zip(ids, [3.0, 1.5, 0.5, 0.0]):
        s.record(rid, gain)
    assert s.select(ids) == [True, True, False, False]


def test_forget_and_many_requests():
    s = DraftSkipper(warmup_rounds=1)
    assert s.select(["a", "b"]) == [True, True]
    s.record("a", 0)
    s.record("b", 4)
    assert s.select(["a", "b"]) == [False, True]
    s.forget("a")
    s.forget("never-seen")
    assert s.select(["a", "b"]) == [True, True]  # a is new again: warm-up
    assert len(s) == 2


def _population(s, accepted, n_requests=12, rounds=4):
    """Finished requests that each drafted `rounds` rounds accepting `accepted` tokens."""
    for i in range(n_requests):
        rid = f"old-{accepted}-{i}"
        for _ in range(rounds):
            s.select([rid])
            s.record(rid, accepted)
        s.forget(rid)


def test_after_a_population_of_useless_drafts_new_requests_skip_from_their_first_step():
    s = DraftSkipper(warmup_rounds=3, probe_interval=8, prior_rounds=32)
    _population(s, 0)
    assert s.population_gain() == 0.0
    start = s.step
    drafted = run(s, "new", lambda step: 0, 40)
    # no warm-up rounds: skipped at once, first drafted round is the probe 8 steps later
    assert drafted[0] == 9 and len(drafted) <= 3, (start, drafted)


def test_a_good_request_in_a_useless_population_resumes_at_its_first_probe():
    s = DraftSkipper(warmup_rounds=3, probe_interval=8, prior_rounds=32, alpha=0.5)
    _population(s, 0)
    drafted = run(s, "good", lambda step: 5, 40)
    assert drafted[0] == 9 and drafted[1:] == list(range(10, 41))[: len(drafted) - 1] and len(drafted) == 32


def test_after_a_useful_population_new_requests_draft_from_their_first_step():
    s = DraftSkipper(warmup_rounds=3, prior_rounds=32)
    _population(s, 4)
    assert s.population_gain() == pytest.approx(4.0)
    assert run(s, "new", lambda step: 4, 20) == list(range(1, 21))


def test_without_the_prior_new_requests_always_warm_up():
    s = DraftSkipper(warmup_rounds=3, probe_interval=8, prior_rounds=None)
    _population(s, 0)
    assert run(s, "new", lambda step: 0, 12)[:3] == [1, 2, 3]
