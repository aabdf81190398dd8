"""Algorithm 1 (PrefixScheduler) and the other verification policies.

Hand-computed cases write the arithmetic out; properties run under hypothesis.
Notation: a[r][j] = prod_{i<=j} c[r][i]; theta = tau * SPS(B).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_serve.scheduler import (
    AsyncPrefixScheduler,
    CostTable,
    FixedPolicy,
    OffPolicy,
    PrefixScheduler,
    ThresholdPolicy,
    VerifyPolicy,
    make_policy,
)

from retrospective import RetrospectiveScheduler

# Two requests used by several hand cases.
#   r0: c = (0.9, 0.5) -> a = (0.9, 0.45)
#   r1: c = (0.6, 0.9) -> a = (0.6, 0.54)
# Ranking (a desc): (r0,1) 0.9, (r1,1) 0.6, (r1,2) 0.54, (r0,2) 0.45
CONF = [[0.9, 0.5], [0.6, 0.9]]
TABLE = CostTable.from_points({2: 10.0, 3: 9.0, 4: 7.0, 5: 6.0, 6: 5.0})


def test_public_api():
    from dspark_serve.scheduler import CostTable as CT, PrefixScheduler as PS

    lengths = PS(CT.from_points({1: 10.0, 64: 10.0})).plan([[0.9, 0.8]])
    assert lengths == [2] and isinstance(lengths, list) and all(type(x) is int for x in lengths)


def test_hand_case_stops_at_first_non_improving_candidate():
    # start: B = 2, tau = 2, best = 2 * SPS(2) = 20
    # (r0,1): B=3, tau=2.9,  theta = 2.9 * 9 = 26.1 > 20   -> admit, l = [1, 0]
    # (r1,1): B=4, tau=3.5,  theta = 3.5 * 7 = 24.5 < 26.1 -> break
    s = PrefixScheduler(TABLE)
    res = s.plan_with_stats(CONF)
    assert res.lengths == [1, 0]
    assert res.num_tokens == 3
    assert res.expected_tokens == pytest.approx(2.9)
    assert res.theta == pytest.approx(26.1)
    assert res.num_candidates == 4
    assert s.last is res


def test_hand_case_jagged_table_retrospective_jumps_the_cliff():
    # SPS flat after B = 4: {2: 10, 3: 9, 4: 7, 5: 7, 6: 7}
    # ours: (r0,1) 2.9*9 = 26.1 admit; (r1,1) 3.5*7 = 24.5 break -> [1, 0]
    # retrospective continues: (r1,2) tau=4.04, 4.04*7 = 28.28 > 26.1 -> [1, 2]
    #                          (r0,2) tau=4.49, 4.49*7 = 31.43 > 28.28 -> [2, 2]
    table = CostTable.from_points({2: 10.0, 3: 9.0, 4: 7.0, 5: 7.0, 6: 7.0})
    assert PrefixScheduler(table).plan(CONF) == [1, 0]
    res = RetrospectiveScheduler(table).plan_with_stats(CONF)
    assert res.lengths == [2, 2]
    assert res.theta == pytest.approx(4.49 * 7)
    assert res.num_tokens == 6


def test_hand_case_prefill_tokens_count_in_B():
    # base_tokens = 1: B = 3, tau = 2, best = 2 * SPS(3) = 18
    # (r0,1): B=4, tau=2.9,  2.9 * 7 = 20.3 > 18   -> [1, 0]
    # (r1,1): B=5, tau=3.5,  3.5 * 6 = 21.0 > 20.3 -> [1, 1]
    # (r1,2): B=6, tau=4.04, 4.04 * 5 = 20.2 < 21  -> break
    res = PrefixScheduler(TABLE).plan_with_stats(CONF, base_tokens=1)
    assert res.lengths == [1, 1]
    assert res.num_tokens == 5
    assert res.expected_tokens == pytest.approx(3.5)
    assert res.theta == pytest.approx(21.0)


def test_hand_case_tokens_of_rows_that_do_not_draft_count_in_tau():
    # One drafting request beside 3 decoding requests that do not draft (base_tokens = 3, each
    # emits a token: other_tokens = 3). Table {4: 10, 5: 9}: B = 4, best = (1 + 3) * 10 = 40;
    # (0,1): a = 0.9, B = 5, (1.9 + 3) * 9 = 44.1 > 40 -> admit; without the other rows' tokens
    # the gain would look like 1.9 * 9 = 17.1 vs 10 (71%), not 10%.
    table = CostTable.from_points({4: 10.0, 5: 9.0, 6: 8.0})
    res = PrefixScheduler(table).plan_with_stats([[0.9, 0.5]], base_tokens=3, other_tokens=3)
    assert res.lengths == [1] and res.expected_tokens == pytest.approx(1.9)
    assert res.theta == pytest.approx(4.9 * 9.0)
    # (0,2): a = 0.45, B = 6: (2.35 + 3) * 8 = 42.8 < 44.1 -> stop; counting only the drafting
    # request it would be 2.35 * 8 = 18.8 > 17.1 and admitted: verification would slow the 3 others
    assert PrefixScheduler(table).plan([[0.9, 0.5]], base_tokens=3) == [2]
    # 30 others: (0,1) gives (1.9 + 30) * 9 = 287.1 < 31 * 10 = 310: nothing pays
    table = CostTable.from_points({31: 10.0, 32: 9.0})
    assert PrefixScheduler(table).plan([[0.9, 0.5]], base_tokens=30, other_tokens=30) == [0]
    assert AsyncPrefixScheduler(table).plan_with_stats([[0.9, 0.5]], base_tokens=30, other_tokens=30).lengths == [0]


def test_hand_case_nothing_pays_off():
    # Appendix A numbers: B = 1, best = 1 * 1.0; (0,1): tau = 1.8, 1.8 * 0.5 = 0.9 < 1 -> break
    table = CostTable.from_points({1: 1.0, 2: 0.5, 3: 0.45})
    res = PrefixScheduler(table).plan_with_stats([[0.8, 0.9]])
    assert res.lengths == [0] and res.num_tokens == 1 and res.theta == pytest.approx(1.0)
    # without the break: (0,2): tau = 1 + 0.8 + 0.72 = 2.52, 2.52 * 0.45 = 1.134 > 1 -> [2]
    assert RetrospectiveScheduler(table).plan([[0.8, 0.9]]) == [2]
    assert RetrospectiveScheduler(table).plan([[0.8, 0.0]]) == [0]


def test_hand_case_ties_go_to_the_smaller_request_index():
    # c = 0.5 for both: a tie at j = 1; (r0,1) is ranked first.
    # B = 2: best = 2 * 10 = 20; (r0,1): 2.5 * 8.5 = 21.25 -> [1, 0]; (r1,1): 3 * 7 = 21 < 21.25 -> break
    table = CostTable.from_points({2: 10.0, 3: 8.5, 4: 7.0})
    assert PrefixScheduler(table).plan([[0.5], [0.5]]) == [1, 0]


def test_hand_case_ties_within_a_request_go_to_the_smaller_j():
    # c = (1.0, 1.0): a = (1, 1) tie; (0,1) before (0,2), so lengths grow 1 then 2, never a gap.
    # B=1 best = 1*10; (0,1): 2 * 9 = 18 -> [1]; (0,2): 3 * 5 = 15 < 18 -> break
    table = CostTable.from_points({1: 10.0, 2: 9.0, 3: 5.0})
    assert PrefixScheduler(table).plan([[1.0, 1.0]]) == [1]


def test_hand_case_caps_zero_confidences_and_inputs():
    flat = CostTable.constant(10.0)
    s = PrefixScheduler(flat)
    # Constant SPS: every candidate with a > 0 within the cap is admitted.
    assert s.plan([[0.9, 0.9, 0.9], [0.5, 0.5, 0.5]], caps=[1, 3]) == [1, 3]
    assert s.plan([[0.9, 0.9, 0.9]], caps=[0]) == [0]
    assert s.plan([[0.9, 0.9]], caps=[9]) == [2]  # a cap above gamma is harmless
    assert s.plan([[0.0, 0.9], [0.9, 0.0, 0.8]]) == [0, 1]  # a = 0 stops a request's candidates
    assert s.plan([[float("nan"), 0.9]]) == [0]  # a broken head admits nothing
    assert s.plan([]) == []
    # Tensors and tuples are accepted and give the same answer as lists.
    assert PrefixScheduler(TABLE).plan(torch.tensor(CONF)) == [1, 0]
    assert PrefixScheduler(TABLE).plan(torch.tensor(CONF, dtype=torch.bfloat16)) == [1, 0]
    assert PrefixScheduler(TABLE).plan(tuple(tuple(r) for r in CONF), caps=(2, 2)) == [1, 0]
    with pytest.raises(ValueError):
        s.plan([[0.5]], caps=[1, 2])


def test_three_requests_hand_case():
    # r0: c=(0.95, 0.9, 0.2) a=(0.95, 0.855, 0.171)
    # r1: c=(0.7, 0.7, 0.7)  a=(0.7, 0.49, 0.343)
    # r2: c=(0.3, 0.9, 0.9)  a=(0.3, 0.27, 0.243)
    # Ranking: (0,1).95 (0,2).855 (1,1).7 (1,2).49 (1,3).343 (2,1).3 (2,2).27 (2,3).243 (0,3).171
    # SPS = 100 - 5 * (B - 3) for B >= 3: S(3)=100 S(4)=95 S(5)=90 S(6)=85 S(7)=80 S(8)=75
    # start B=3 tau=3 best=300
    # (0,1): tau=3.95  B=4  3.95*95 = 375.25   admit
    # (0,2): tau=4.805 B=5  4.805*90 = 432.45  admit
    # (1,1): tau=5.505 B=6  5.505*85 = 467.925 admit
    # (1,2): tau=5.995 B=7  5.995*80 = 479.6   admit -> [2, 2, 0]
    # (1,3): tau=6.338 B=8  6.338*75 = 475.35  < 479.6 break
    table = CostTable.from_points({3: 100.0, 20: 15.0})
    conf = [[0.95, 0.9, 0.2], [0.7, 0.7, 0.7], [0.3, 0.9, 0.9]]
    res = PrefixScheduler(table).plan_with_stats(conf)
    assert res.lengths == [2, 2, 0]
    assert res.theta == pytest.approx(479.6)
    assert res.expected_tokens == pytest.approx(5.995)


# ---------------------------------------------------------------- async


def test_async_falls_back_to_algorithm_1_then_uses_the_capacity_from_two_steps_ago():
    table = CostTable.from_points({2: 10.0, 3: 9.0, 4: 7.0, 5: 7.0, 6: 7.0})
    s = AsyncPrefixScheduler(table)
    assert s.capacity is None
    # Steps 1 and 2: not enough history -> Algorithm 1 on the current step ([1, 0], K = 1).
    assert s.plan(CONF) == [1, 0] and s.capacity == 1
    low = [[0.1, 0.1], [0.1, 0.1]]
    assert s.plan(low) == PrefixScheduler(table).plan(low) and s.capacity == 0
    # Step 3: K from step 1's confidences by a global search = 4 (the retrospective [2, 2]);
    # the top-4 of the current step's ranking is every candidate.
    assert s.plan([[0.2, 0.2], [0.3, 0.3]]) == [2, 2] and s.capacity == 4
    # Step 4: K from step 2 (all a = 0.1 / 0.01): (0.1*2+2)*9 = 19.8 < 20 ... no K > 0 beats K = 0.
    assert s.plan(CONF) == [0, 0] and s.capacity == 0
    s.reset()
    assert s.capacity is None and s.plan(CONF) == [1, 0]


def test_async_top_k_is_by_prefix_survival_with_ties_to_smaller_j_then_r():
    flat = CostTable.constant(1.0)  # global search on a flat table admits everything
    s = AsyncPrefixScheduler(flat, lag=1)
    s.plan([[0.9, 0.9, 0.9]])  # K for the next step = 3
    # current a: r0 = (0.5, 0.25, ...), r1 = (0.5, 0.5, 0.5): ranking (0,1) (1,1) (1,2) (1,3) (0,2) ...
    assert s.plan([[0.5, 0.5, 0.5], [0.5, 1.0, 1.0]]) == [1, 2] and s.capacity == 3
    # caps still bind
    s.plan([[0.9, 0.9, 0.9]])
    assert s.plan([[0.5, 0.5, 0.5], [0.5, 1.0, 1.0]], caps=[3, 1]) == [2, 1]


# ---------------------------------------------------------------- threshold / fixed / off


def test_threshold_policy():
    conf = [[0.9, 0.8, 0.4, 0.9], [0.3, 0.9, 0.9, 0.9], [0.95, 0.95, 0.95, 0.95]]
    assert ThresholdPolicy(0.5).plan(conf) == [2, 0, 4]
    # cumulative: a = (0.9, 0.72, 0.288, ..), (0.3, ..), (0.95, 0.9025, 0.857, 0.8145)
    assert ThresholdPolicy(0.7, cumulative=True).plan(conf) == [2, 0, 4]
    assert ThresholdPolicy(0.85, cumulative=True).plan(conf) == [1, 0, 3]
    assert ThresholdPolicy(0.5).plan(conf, caps=[1, 5, 2]) == [1, 0, 2]
    assert ThresholdPolicy(0.0).plan([[0.0, 0.5]]) == [0]
    with pytest.raises(ValueError):
        ThresholdPolicy(1.5)


def test_fixed_and_off_accept_base_tokens():
    assert FixedPolicy(4).plan([[0.1] * 4] * 3, [2, 7, 0], base_tokens=5) == [2, 4, 0]
    assert FixedPolicy(4).plan([[0.1] * 4] * 2) == [4, 4]
    assert OffPolicy().plan([[0.9] * 4] * 2, [3, 3], base_tokens=1) == [0, 0]
    assert OffPolicy().plan([[0.9] * 4] * 2) == [0, 0]


def test_make_policy():
    table = CostTable.constant(1.0)
    assert isinstance(make_policy("scheduled", 7, table), PrefixScheduler)
    assert not isinstance(make_policy("scheduled", 7, table), AsyncPrefixScheduler)
    a = make_policy("async", 7, cost_table=table, lag=3)
    assert isinstance(a, AsyncPrefixScheduler) and a.lag == 3
    t = make_policy("threshold", 7, threshold=0.6, cumulative=True)
    assert isinstance(t, ThresholdPolicy) and t.threshold == 0.6 and t.cumulative
    f = make_policy("fixed", 5)
    assert isinstance(f, FixedPolicy) and f.gamma == 5
    assert isinstance(make_policy("off", 5), OffPolicy)
    for name in ("scheduled", "async"):
        with pytest.raises(ValueError, match="cost table"):
            make_policy(name, 7)
    with pytest.raises(ValueError, match="unknown verification policy 'greedy'.*scheduled"):
        make_policy("greedy", 7)
    with pytest.raises(ValueError):
        make_policy("fixed", 7, threshold=0.5)
    with pytest.raises(ValueError):
        make_policy("threshold", 7, lag=2)
    assert all(isinstance(p, VerifyPolicy) for p in (a, t, f))


# ---------------------------------------------------------------- properties

conf_value = st.one_of(st.floats(min_value=0.05, max_value=1.0), st.just(0.0))


@st.composite
def batches(draw, min_conf=0.0):
    R = draw(st.integers(1, 8))
    gamma = draw(st.integers(1, 7))
    value = st.floats(min_value=0.0, max_value=1.0) if min_conf == 0.0 else conf_value
    conf = [[draw(value) for _ in range(gamma)] for _ in range(R)]
    caps = draw(st.lists(st.integers(0, 9), min_size=R, max_size=R))
    base = draw(st.integers(0, 8))
    return conf, caps, base


tables = st.dictionaries(st.integers(1, 80), st.floats(0.1, 100.0), min_size=1, max_size=8).map(CostTable.from_points)


def all_policies(table):
    return [PrefixScheduler(table), RetrospectiveScheduler(table), AsyncPrefixScheduler(table),
            AsyncPrefixScheduler(table, lag=1), ThresholdPolicy(0.5), ThresholdPolicy(0.3, cumulative=True),
            FixedPolicy(7), FixedPolicy(3), OffPolicy()]


@settings(max_examples=150, deadline=None)
@given(st.lists(batches(), min_size=1, max_size=4), tables)
def test_lengths_within_zero_and_min_gamma_cap(steps, table):
    policies = all_policies(table)  # async schedulers carry history across the steps
    for conf, caps, base in steps:
        gamma = len(conf[0])
        for p in policies:
            lengths = p.plan(conf, caps, base_tokens=base)
            assert len(lengths) == len(conf)
            for l, cap in zip(lengths, caps):
                assert isinstance(l, int) and 0 <= l <= min(gamma, cap), (p.name, lengths, caps)


def leading_positive(row, cap):
    n, a = 0, 1.0
    for c in row[: max(cap, 0)]:
        a *= c
        if a <= 0:
            break
        n += 1
    return n


@settings(max_examples=150, deadline=None)
@given(batches(min_conf=0.05), st.floats(0.5, 50.0))
def test_constant_sps_admits_every_candidate_with_positive_survival(batch, sps):
    # Confidences are 0 or >= 0.05, so every a > 0 is big enough to change tau in floating point.
    conf, caps, base = batch
    table = CostTable.from_points({1: sps, 100: sps})
    expect = [leading_positive(row, cap) for row, cap in zip(conf, caps)]
    assert PrefixScheduler(table).plan(conf, caps, base_tokens=base) == expect
    assert RetrospectiveScheduler(table).plan(conf, caps, base_tokens=base) == expect


@settings(max_examples=150, deadline=None)
@given(batches())
def test_steeply_falling_sps_admits_nothing(batch):
    # SPS(B) = 2^-B: one more draft gives (R + a) * 2^-(B+1) <= (R + 1)/2 * 2^-B <= R * 2^-B.
    conf, caps, base = batch
    table = CostTable.from_points({b: 2.0 ** -b for b in range(1, 40)})
    assert PrefixScheduler(table).plan(conf, caps, base_tokens=base) == [0] * len(conf)
    assert RetrospectiveScheduler(table).plan(conf, caps, base_tokens=base) == [0] * len(conf)


@settings(max_examples=200, deadline=None)
@given(batches(min_conf=0.05), st.data(), tables)
def test_uniformly_more_confident_request_never_gets_a_shorter_length(batch, data, table):
    conf, caps, base = batch
    if len(conf) == 1:  # the pair needs two requests
        conf.append(list(conf[0]))
        caps.append(caps[0])
    R, gamma = len(conf), len(conf[0])
    hi = data.draw(st.integers(0, R - 1), label="hi")
    lo = (hi + data.draw(st.integers(1, R - 1), label="offset")) % R
    # lo's confidences are hi's scaled by factors <= 0.99: strictly lower wherever positive.
    factors = data.draw(st.lists(st.floats(0.0, 0.99), min_size=gamma, max_size=gamma), label="factors")
    conf[lo] = [c * f for c, f in zip(conf[hi], factors)]
    caps[lo] = caps[hi]
    for p in [PrefixScheduler(table), RetrospectiveScheduler(table), ThresholdPolicy(0.4),
              ThresholdPolicy(0.4, cumulative=True)]:
        lengths = p.plan(conf, caps, base_tokens=base)
        assert lengths[hi] >= lengths[lo], (p.name, lengths, hi, lo)
    # async: after a warm-up step, the top-K admission is monotone as well
    a = AsyncPrefixScheduler(table, lag=1)
    a.plan(conf, caps, base_tokens=base)
    lengths = a.plan(conf, caps, base_tokens=base)
    assert lengths[hi] >= lengths[lo]


@settings(max_examples=150, deadline=None)
@given(batches(), tables)
def test_admitted_set_is_a_prefix_of_the_ranking(batch, table):
    # Algorithm 1's plan is exactly the longest improving prefix of the ranked candidates.
    from dspark_serve.scheduler.prefix import candidates

    conf, caps, base = batch
    res = PrefixScheduler(table).plan_with_stats(conf, caps, base_tokens=base)
    ranked = candidates(conf, caps)
    k = sum(res.lengths)
    admitted = ranked[:k]
    for r in range(len(conf)):
        js = sorted(j for _, j, rr in admitted if rr == r)
        assert js == list(range(1, res.lengths[r] + 1))
    assert res.num_tokens == len(conf) + base + k


def test_the_drafting_seconds_of_the_step_make_verification_cheaper_in_relative_terms():
    # SPS(1) = 10, SPS(2) = 8: one more token costs 0.025 s on top of 0.1 s. A draft with a = 0.2
    # does not pay for that alone (1 * 10 = 10 > 1.2 * 8 = 9.6), but once a 0.4 s drafting pass has
    # run (it is paid either way) the step takes 0.5 vs 0.525 s: 1 / 0.5 = 2.0 < 1.2 / 0.525 = 2.29.
    table = CostTable.from_points({1: 10.0, 2: 8.0, 3: 8.0})
    s = PrefixScheduler(table)
    assert s.plan([[0.2]]) == [0]
    res = s.plan_with_stats([[0.2]], fixed_seconds=0.4)
    assert res.lengths == [1]
    assert res.theta == pytest.approx(1.2 / (1 / 8.0 + 0.4))
    assert s.plan([[0.2]], fixed_seconds=0.0) == [0]


def test_async_capacity_uses_the_drafting_seconds_of_its_own_step():
    table = CostTable.from_points({1: 10.0, 2: 8.0, 3: 8.0})
    s = AsyncPrefixScheduler(table, lag=1)
    s.plan([[0.2]], fixed_seconds=0.4)  # history: this step's confidences with its 0.4 s
    assert s.plan([[0.2]]) == [1] and s.capacity == 1  # K from the step before, with its drafting time
    assert s.plan([[0.2]]) == [0] and s.capacity == 0  # the step before had none
