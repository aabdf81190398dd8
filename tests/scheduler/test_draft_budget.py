"""Load-aware drafting: the positions a step drafts follow what the last plans verified and paid."""

from __future__ import annotations

import pytest

from scheduler import DraftBudget


def test_a_fresh_budget_drafts_gamma_then_follows_the_longest_recent_plan_plus_one():
    b = DraftBudget(gamma=7, history=3)
    assert b.positions() == 7
    for longest in (2, 1, 1):
        b.record(longest, paid=True)
    assert b.positions() == 3  # max(2, 1, 1) + 1
    for longest in (1, 1, 1):
        b.record(longest, paid=True)  # the 2 has left the window
    assert b.positions() == 2
    b.record(7, paid=True)
    assert b.positions() == 7  # never above gamma


def test_steps_that_do_not_pay_back_off_exponentially_and_a_paying_probe_resets():
    b = DraftBudget(gamma=4, max_backoff=8)
    drafted = []
    for _ in range(40):
        n = b.positions()
        drafted.append(n)
        if n:
            b.record(0, paid=False)
    # probes after 1, 2, 4, 8, 8, ... plain steps
    probes = [i for i, n in enumerate(drafted) if n]
    assert probes[:6] == [0, 2, 5, 10, 19, 28]
    assert b.plain_steps == len(drafted) - len(probes)
    b.record(3, paid=True)
    assert b.positions() == 4 and b.positions() == 4  # drafting every step again


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError):
        DraftBudget(gamma=0)
    with pytest.raises(ValueError):
        DraftBudget(gamma=3, max_backoff=0)


def test_plain_steps_price_from_the_nearest_recent_measurement_along_the_profiled_shape():
    from scheduler import PlainSteps

    p = PlainSteps(horizon=10, alpha=0.5, tolerance=1.25)
    shape = lambda a, b: b / a  # a profile where seconds grow with tokens
    assert p.seconds(8, shape) is None  # nothing measured yet: the caller falls back to the profile
    p.observe(8, 0.010)
    p.observe(8, 0.020)  # EMA: 0.015
    assert p.seconds(8, shape) == pytest.approx(0.015)
    assert p.seconds(9, shape) == pytest.approx(0.015 * 9 / 8)  # within the tolerance, moved along the shape
    assert p.seconds(11, shape) is None  # 11 / 8 > 1.25: too far to price from
    p.observe(11, 0.030)
    assert p.seconds(9, shape) == pytest.approx(0.015 * 9 / 8)  # the nearer of 8 and 11 (log distance)
    assert p.seconds(10, shape) == pytest.approx(0.030 * 10 / 11)
    for _ in range(11):
        p.tick()  # drafted steps: the measurements age
    assert p.seconds(8, shape) is None and p.seconds(11, shape) is None
    p.observe(8, 0.040)  # a stale measurement is replaced, not averaged
    assert p.seconds(8, shape) == pytest.approx(0.040)


def test_realised_share_scales_expected_gain_by_what_recent_steps_realised():
    from scheduler import RealisedShare

    s = RealisedShare(history=4, low=0.1, high=1.5, prior=0.0)
    assert s.share == 1.0  # no history: trust the plan
    for _ in range(4):
        s.record(expected_gain=10.0, realised_gain=5.0)
    assert s.share == pytest.approx(0.5)
    for _ in range(4):
        s.record(expected_gain=10.0, realised_gain=0.0)  # the window forgets the older steps
    assert s.share == pytest.approx(0.1)  # bounded below: a probe can still bring drafting back
    s.record(expected_gain=10.0, realised_gain=40.0)
    assert s.share == pytest.approx(40.0 / 40.0)
    for _ in range(4):
        s.record(expected_gain=1.0, realised_gain=10.0)
    assert s.share == 1.5  # bounded above


def test_realised_share_shrinks_a_few_rounds_towards_the_plan():
    from scheduler import RealisedShare

    s = RealisedShare(history=16, prior=4.0)
    s.record(expected_gain=0.5, realised_gain=0.0)  # one unlucky round of one request
    assert s.share == pytest.approx(2.0 / 2.5)  # (0 + 4 * 0.5) / (0.5 + 4 * 0.5)
    for _ in range(15):
        s.record(expected_gain=0.5, realised_gain=0.0)
    assert s.share == pytest.approx(0.2)  # 16 rounds outweigh the prior of 4
