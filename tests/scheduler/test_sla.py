"""Speed floors (scheduler/sla.py): the floors' drafts in the plan, their exactness, admission."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import chisquare

from dspark_serve.scheduler import CostTable, PrefixScheduler
from dspark_serve.scheduler.sla import FloorView, SpeedFloors
from test_appendix_a import P_T, P_T2, ROUNDS, TABLE, TABLE2, first_tokens, first_two_tokens

A = 0


class Weighted:
    """Algorithm 1 with the request weighted by its speed floor (and one token of another row)."""

    def __init__(self, table, weight: float, other: int = 1):
        self.inner = PrefixScheduler(table)
        self.weight, self.other = weight, other

    def plan(self, confidences):
        return self.inner.plan(confidences, other_tokens=self.other, weights=[self.weight] * len(confidences))


class LookAheadFloor:
    """A mutant floor rule that reads a[j + 1] to decide draft j ("do not verify a draft whose
    successor is hopeless"): a[j + 1] depends on draft j's own token."""

    def plan(self, confidences):
        out = []
        for row in confidences:
            l, a = 0, 1.0
            while l < len(row):
                a *= row[l]
                nxt = a * row[l + 1] if l + 1 < len(row) else a
                if a <= 0 or nxt <= 0:
                    break
                l += 1
            out.append(l)
        return out


def test_unit_weights_leave_algorithm_1_unchanged():
    rng = random.Random(7)
    table = CostTable.from_points({1: 50.0, 4: 48.0, 8: 44.0, 16: 35.0, 32: 20.0, 64: 11.0})
    s = PrefixScheduler(table)
    for _ in range(300):
        r = rng.randint(1, 8)
        conf = [[rng.random() for _ in range(5)] for _ in range(r)]
        caps = [rng.randint(0, 5) for _ in range(r)]
        base, other = rng.randint(0, 20), rng.randint(0, 3)
        plain = s.plan_with_stats(conf, caps, base, other_tokens=other)
        for weights in ([1.0] * r, [rng.random() for _ in range(r)]):  # weights below 1 count as 1
            got = s.plan_with_stats(conf, caps, base, other_tokens=other, weights=weights)
            assert (got.lengths, got.num_tokens, got.expected_tokens, got.theta, got.weighted_drafts) == \
                (plain.lengths, plain.num_tokens, plain.expected_tokens, plain.theta, 0)
    with pytest.raises(ValueError):
        s.plan([[0.5]], weights=[2.0, 1.0])


def test_a_weighted_request_is_verified_first_and_further():
    # SPS falls with B: Algorithm 1 verifies the more confident request's drafts only
    table = CostTable.from_points({2: 10.0, 3: 9.0, 4: 7.5, 5: 5.0, 8: 2.0})
    s = PrefixScheduler(table)
    conf = [[0.6, 0.6, 0.6], [0.9, 0.9, 0.9]]
    assert s.plan(conf) == [0, 2]
    res = s.plan_with_stats(conf, weights=[3.0, 1.0])  # request 0 below its floor: 3 x 0.6 > 0.9
    assert res.lengths == [1, 0] and res.weighted_drafts == 1
    assert res.expected_tokens == pytest.approx(2 + 0.6)  # tau itself is not weighted
    # and only while the weighted throughput pays: a steep curve verifies nothing even for it
    steep = PrefixScheduler(CostTable.from_points({2: 10.0, 3: 4.0, 8: 1.0}))
    assert steep.plan(conf, weights=[3.0, 1.0]) == [0, 0]


def test_floor_weights_keep_the_first_token_exact():
    # Appendix A's experiment with the request weighted 3 beside one other token: the weighted plan
    # verifies draft 1 on TABLE2 whatever x1 is and draft 2 only when x1 made c_2 > 0; the output is
    # still the target's law
    s = Weighted(TABLE2, 3.0)
    assert s.plan([[0.8, 0.9]]) == [2] and s.plan([[0.8, 0.0]]) == [1]  # the length depends on x1
    counts = first_tokens(s)
    assert chisquare(counts, [ROUNDS * P_T[0], ROUNDS * P_T[1]]).pvalue > 0.01
    # power: the same simulator catches a floor rule that looks one draft ahead
    bad = first_tokens(LookAheadFloor())
    assert chisquare(bad, [ROUNDS * P_T[0], ROUNDS * P_T[1]]).pvalue < 1e-6


def test_floor_weights_keep_the_first_two_tokens_exact():
    expect = [P_T[a] * P_T2[a][b] * ROUNDS for a in (0, 1) for b in (0, 1)]
    assert chisquare(first_two_tokens(Weighted(TABLE2, 3.0)), expect).pvalue > 0.01
    assert chisquare(first_two_tokens(Weighted(TABLE, 4.0, other=2)), expect).pvalue > 0.01
    assert chisquare(first_two_tokens(LookAheadFloor()), expect).pvalue < 1e-6


def _floors(**kw) -> SpeedFloors:
    f = SpeedFloors(**kw)
    f.observe_step(0.1, 4, 4, 4, None)  # 100 ms steps, one token per request per step
    return f


def test_weights_from_the_speed_so_far():
    f = _floors()
    assert f.weight(FloorView(20.0, 30, 1.0)) == 1.0  # 30 tok/s >= 20
    assert f.weight(FloorView(20.0, 1, 0.1)) == 1.0  # not judged yet (min_elapsed)
    assert f.weight(FloorView(0.0, 1, 5.0)) == 1.0  # no floor
    assert f.weight(FloorView(20.0, 10, 1.0)) == pytest.approx(2.0)  # 10 tok/s: F / v
    assert f.weight(FloorView(20.0, 1, 1.0)) == pytest.approx(4.0)  # at most max_weight
    assert f.floor_of(None) == 0.0 and SpeedFloors(12.0).floor_of(None) == 12.0 and SpeedFloors(12.0).floor_of(0) == 0.0
    with pytest.raises(ValueError):
        SpeedFloors(-1.0)
    with pytest.raises(ValueError):
        SpeedFloors(math.inf)


def test_admission_holds_while_floors_are_at_risk():
    seconds_of = CostTable.from_points({1: 100.0, 2: 50.0, 3: 100.0 / 3, 4: 25.0, 8: 12.5}).seconds  # 10 ms per token
    f = SpeedFloors(1000.0)  # the server's floor caps what a request's own floor may hold
    fast = FloorView(30.0, 100, 1.0)  # 100 tok/s so far
    # before any decoding step is measured: one request at a time
    assert f.admissions([], [30.0] * 5, seconds_of) == 1 and f.admissions([fast], [30.0], seconds_of) == 0
    f.tokens_per_request, f.fed_per_request, f.overhead = 1.0, 1.0, 1.0
    # predicted per-user speed with R requests: 100 / R tok/s; a floor of 30 fits 3
    assert f.admissions([], [30.0] * 5, seconds_of) == 3
    assert f.admissions([fast], [30.0] * 5, seconds_of) == 2
    assert f.admissions([fast] * 3, [30.0], seconds_of) == 0
    assert f.admissions([fast] * 3, [0.0, 0.0], seconds_of) == 0  # the running ones' floors hold too
    assert f.admissions([FloorView(0.0, 10, 1.0)] * 5, [0.0] * 3, seconds_of) == 3  # no floors: no limit
    assert f.admissions([FloorView(0.0, 10, 1.0)], [0.0, 40.0, 0.0], seconds_of) == 1  # 40 tok/s fits 2
    # measured steps cost twice the table: 50 / R tok/s, a floor of 30 fits 1
    f.overhead = 2.0
    assert f.admissions([], [30.0] * 3, seconds_of) == 1
    # a floor no request could reach even alone (> 50 tok/s now) is best effort: it holds nothing
    assert f.admissions([FloorView(500.0, 20, 1.0)] * 4, [500.0] * 2, seconds_of) == 2
    # ...unless a request finished recently at that speed: the model (measured under load) is then
    # too pessimistic about a lone request, and the floor counts
    f.finished(FloorView(0.0, 600, 1.0))
    assert f.solo_speed(seconds_of) == 600.0
    assert f.admissions([FloorView(500.0, 20, 1.0)] * 4, [500.0] * 2, seconds_of) == 0
    # and with nothing running one is admitted whatever the model predicts (no deadlock)
    assert f.admissions([], [500.0] * 2, seconds_of) == 1
    # without a cost table only measured speeds hold: a running request below its floor
    assert f.admissions([fast] * 6, [30.0] * 2, None) == 2
    assert f.admissions([FloorView(30.0, 20, 1.0)], [0.0], None) == 0
    # a request's own floor holds the queue only up to the server's: none without one
    f.default_floor = 0.0
    assert f.admissions([FloorView(30.0, 20, 1.0)], [0.0], None) == 1
    f.default_floor = 20.0
    f.overhead = 1.0
    assert f.admissions([], [30.0] * 5, seconds_of) == 5  # 20 tok/s fits 5


def test_outcomes_and_metrics():
    f = SpeedFloors(10.0)
    assert f.attainment is None
    f.finished(FloorView(10.0, 30, 1.0))
    f.finished(FloorView(10.0, 5, 1.0))
    f.finished(FloorView(0.0, 5, 1.0))  # no floor: not counted
    f.finished(FloorView(10.0, 0, 0.0))  # one token: no speed, not counted
    snap = f.snapshot()
    assert (snap["sla_requests_met"], snap["sla_requests_missed"], snap["sla_attainment_ratio"]) == (1, 1, 0.5)
    assert snap["sla_default_floor"] == 10.0
