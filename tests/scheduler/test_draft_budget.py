"""Load-aware drafting: the positions a step drafts follow what the last plans verified and paid."""

from __future__ import annotations

import pytest

from dspark_serve.scheduler import DraftBudget


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
    from dspark_serve.scheduler import PlainSteps

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


def test_drafted_steps_judge_the_realised_rate_of_a_window_against_plain():
    from dspark_serve.scheduler import DraftedSteps

    d = DraftedSteps(window=3)
    # 10 tokens in 20 ms against 8 plain tokens in 10 ms: 0.5 vs 0.8 tokens per ms, it lost
    assert d.record(tokens=10, seconds=0.020, plain_tokens=8, plain_seconds=0.010) is False
    # a step that won big outweighs it: (10 + 40) / 40 ms = 1.25 > (8 + 8) / 20 ms = 0.8
    assert d.record(tokens=40, seconds=0.020, plain_tokens=8, plain_seconds=0.010) is True
    # a single row's unlucky round (1 token: nothing accepted) does not condemn drafting at once
    assert d.record(tokens=1, seconds=0.015, plain_tokens=1, plain_seconds=0.010) is True
    # the window forgets: three losing steps in a row end it
    for _ in range(2):
        d.record(tokens=1, seconds=0.015, plain_tokens=1, plain_seconds=0.010)
    assert d.record(tokens=1, seconds=0.015, plain_tokens=1, plain_seconds=0.010) is False
    with pytest.raises(ValueError):
        DraftedSteps(window=0)


def test_a_step_with_a_prompt_chunk_is_weighed_in_seconds_not_by_its_bulk():
    """Measured in the engine at c = 16: a drafted step that carried a prompt chunk realised 32
    tokens in 789 ms against a plain step's 16 in 668 ms. As a ratio of sums its bulk judged the
    losing decode steps after it paid; in seconds, its 16 extra tokens were worth 60 ms of plain
    decoding (3.75 ms per token) and cost 121 ms, and the window says drafting lost."""
    from dspark_serve.scheduler import DraftedSteps

    d = DraftedSteps(window=4)
    assert d.record(tokens=32, seconds=0.789, plain_tokens=16, plain_seconds=0.668, unit=0.060 / 16) is False
    assert d.record(tokens=20, seconds=0.110, plain_tokens=16, plain_seconds=0.057) is False
    ratio_of_sums = (32 + 20) / (0.789 + 0.110) > (16 + 16) / (0.668 + 0.057)
    assert ratio_of_sums  # what the former verdict said: paid
    d.clear()
    # a step that gains more than its extra seconds still pays, prompt chunk or not
    assert d.record(tokens=40, seconds=0.700, plain_tokens=16, plain_seconds=0.668, unit=0.060 / 16) is True


def test_backoff_is_kept_per_load_level():
    """A verdict holds for the load it was measured at: drafting that kept failing at 16 requests
    backs off to 128 steps there; at 8 requests (a lighter level) the next step probes at once,
    and when the load comes back to 16 the long backoff is still there. A failure at a light load
    holds for heavier ones; a paying step clears its level and the lighter ones."""
    b = DraftBudget(gamma=4, max_backoff=128)
    assert b.level(15) == b.level(16) == b.level(17) and b.level(12) < b.level(16) < b.level(18)
    for _ in range(8):  # drafting keeps failing at 16 requests: the backoff grows to 128
        assert b.positions(16) > 0
        b.record(1, paid=False, batch=16)
        while b._state(b.level(16))[1] > b._step + 1:
            assert b.positions(16) == 0
    assert b._state(b.level(16))[0] == 128
    assert b.positions(16) > 0
    b.record(1, paid=False, batch=16)
    assert b.positions(15) == 0  # the same level: still backing off
    assert b.positions(8) == 2  # a lighter load probes at once
    b.record(1, paid=True, batch=8)
    assert b.positions(8) == 2 and b.positions(16) == 0  # pays at 8; 16 keeps its backoff
    b.record(1, paid=False, batch=8)  # loses at 8: at 8 and at every heavier load
    assert b.positions(8) == 0 and b.positions(4) == 2
    b.record(1, paid=True, batch=24)  # pays at 24: clears 24 and every lighter level
    assert b.positions(8) == 2 and b.positions(16) == 2


def test_an_unknown_load_is_one_level():
    b = DraftBudget(gamma=4)
    b.record(2, paid=False)  # no batch: level 0, the lightest, holds for every load
    assert b.positions() == 0 and b.positions(16) == 3


def _table():
    """A two-core CPU's shape: a forward costs 18 ms + 4.5 ms per token (compute-bound), the
    drafting pass 6 ms + 2.5 ms per sequence."""
    from dspark_serve.scheduler import CostTable

    return CostTable({b: 1.0 / (0.018 + 0.0045 * b) for b in (1, 2, 4, 8, 16, 32, 64, 128)},
                     draft={n: 0.006 + 0.0025 * n for n in (1, 2, 4, 8, 16, 32)})


def test_the_forecast_prices_the_best_case_of_the_acceptance_seen():
    from dspark_serve.scheduler import DraftForecast

    t = _table()
    f = DraftForecast(gamma=4, cost_table=t, margin=1.0, min_rounds=4)
    assert f.may_pay(16) and f.best_ratio(16) is None  # no history yet: drafting may pay
    for _ in range(200):  # the first draft accepted 3 times in 4, the second half the time it is reached
        f.record(2, 0)
        for _ in range(3):
            f.record(2, 1)
        f.record(2, 2)
        f.record(2, 2)
    s = f.survival()
    assert s[0] == pytest.approx(5 / 6, abs=0.01) and s[1] == pytest.approx(5 / 6 * 2 / 5, abs=0.01)
    assert s[2] < s[1] and s[3] < s[2]  # never verified beyond 2: leans on the positions before
    # at n = 1: the best L of (1 + S_1 + ... + S_L) / (drafting 8.5 ms + a forward of 1 + L) against
    # 1 / (a forward of 1, 22.5 ms)
    by_hand = max((1 + sum(s[:L])) / (0.0085 + t.seconds(1 + L)) for L in range(1, 5)) * 0.0225
    assert f.best_ratio(1) == pytest.approx(by_hand)
    assert f.best_ratio(1) > 1.0 and f.may_pay(1)  # one request: the forward's fixed cost makes drafts cheap
    # a round's expected yield (the verdict's tokens): 1 + S_1 + ... + S_L, whatever it accepted itself
    assert f.ready and f.expected_tokens(2) == pytest.approx(1 + s[0] + s[1])
    assert f.expected_tokens(9) == pytest.approx(1 + sum(s)) and f.expected_tokens(0) == 1.0
    assert not DraftForecast(gamma=4, cost_table=t, min_rounds=4).ready
    assert f.best_ratio(16) < 0.8 and not f.may_pay(16)  # 16: every verified token costs a decode token
    f2 = DraftForecast(gamma=4, cost_table=_table(), margin=1.0, min_rounds=4)
    for _ in range(50):
        f2.record(4, 4)  # a workload the drafter copies perfectly (a lookup of repeated text)
    assert f2.may_pay(16)


def test_the_forecast_keeps_steps_plain_without_probes_and_still_explores():
    """Where the forecast says no, the step decodes plainly and no probe is paid; one refusal in
    `explore` drafts anyway. A level whose last verdict paid (or a heavier one's) drafts without
    asking it; a loss there hands the level back to it."""
    said = {"pay": False}
    b = DraftBudget(gamma=4, forecast=lambda n: said["pay"], explore=10)
    drafted = [b.positions(16) for _ in range(30)]
    assert [i for i, n in enumerate(drafted) if n] == [9, 19, 29]  # exploration only
    assert b.forecast_steps == 27 and b.plain_steps == 27
    b.record(1, paid=True, batch=16)
    assert all(b.positions(n) for n in (16, 8, 4))  # paid at 16: 16 and lighter loads draft
    assert b.positions(32) == 0  # a heavier load asks the forecast
    b.record(1, paid=False, batch=8)  # a loss at 8: 8 and heavier back off, then ask the forecast again
    while b._state(b.level(8))[1] > b._step + 1:
        b.positions(8)
    assert b.positions(8) == 0 and b.forecast_steps > 28
    said["pay"] = True
    assert b.positions(8) == 2


def test_a_table_without_a_profiled_drafting_pass_never_refuses():
    """A cost table saved before the drafting pass was profiled: the forecast cannot price a draft
    and never refuses (the verdicts alone decide, as before)."""
    from dspark_serve.scheduler import CostTable, DraftForecast

    f = DraftForecast(gamma=3, cost_table=CostTable({1: 50.0}), min_rounds=1)
    f.record(3, 1)
    assert f.rounds == 1 and f.best_ratio(4) is None and f.may_pay(4)
