"""CostTable: interpolation, hold-at-ends, isotonic smoothing, online refresh, files, profiling."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dspark_serve.scheduler import CostTable, default_grid, profile_cost_table

points_st = st.dictionaries(
    st.integers(min_value=1, max_value=512),
    st.floats(min_value=0.01, max_value=1000.0, allow_nan=False),
    min_size=1,
    max_size=12,
)


def test_points_are_used_as_given_and_interpolated_linearly():
    t = CostTable.from_points({1: 100.0, 4: 70.0, 8: 30.0})
    assert t.points == {1.0: 100.0, 4.0: 70.0, 8.0: 30.0}
    assert t.sps(1) == 100.0 and t.sps(4) == 70.0 and t.sps(8) == 30.0
    assert t.sps(2) == pytest.approx(90.0)  # 100 + (70 - 100) * 1/3
    assert t.sps(6) == pytest.approx(50.0)  # halfway between 70 and 30
    assert t.sps(2.5) == pytest.approx(85.0)  # float B
    assert t.sps(0.5) == 100.0 and t.sps(0) == 100.0  # held below the first point
    assert t.sps(1000) == 30.0  # held above the last point
    assert t.seconds(8) == pytest.approx(1 / 30)


def test_invalid_points_are_rejected():
    with pytest.raises(ValueError):
        CostTable.from_points({})
    with pytest.raises(ValueError):
        CostTable.from_points({1: 0.0})
    with pytest.raises(ValueError):
        CostTable.from_points({0: 1.0})
    with pytest.raises(ValueError):
        CostTable.from_points({1: float("nan")})


@settings(max_examples=100, deadline=None)
@given(points_st, st.floats(min_value=0.0, max_value=600.0))
def test_interpolation_and_hold_at_ends(points, b):
    t = CostTable.from_points(points)
    xs = sorted(points)
    for x in xs:
        assert t.sps(x) == pytest.approx(points[x])
    v = t.sps(b)
    if b <= xs[0]:
        assert v == points[xs[0]]
    elif b >= xs[-1]:
        assert v == points[xs[-1]]
    else:
        lo = max(x for x in xs if x <= b)
        hi = min(x for x in xs if x > b)
        expect = points[lo] + (points[hi] - points[lo]) * (b - lo) / (hi - lo)
        assert v == pytest.approx(expect, rel=1e-9)
        assert min(points[lo], points[hi]) - 1e-9 <= v <= max(points[lo], points[hi]) + 1e-9


@settings(max_examples=100, deadline=None)
@given(points_st)
def test_smoothed_is_monotone_non_increasing_and_the_isotonic_fit(points):
    from scipy.optimize import isotonic_regression

    t = CostTable.from_points(points)
    s = t.smoothed()
    ys = list(s.points.values())
    assert all(a >= b for a, b in zip(ys, ys[1:]))
    assert list(s.points) == list(t.points)  # same buckets
    expect = isotonic_regression(list(t.points.values()), increasing=False).x
    np.testing.assert_allclose(ys, expect, rtol=1e-9)
    # A table that is already monotone is unchanged; the original is never modified.
    assert s.smoothed().points == pytest.approx(s.points)
    assert t.points == {float(k): float(v) for k, v in sorted(points.items())}


def test_smoothed_pools_adjacent_violators():
    t = CostTable.from_points({1: 10.0, 2: 12.0, 4: 8.0, 8: 9.0, 16: 2.0})
    # (10, 12) pool to 11; (8, 9) pool to 8.5; 2 stays.
    assert list(t.smoothed().points.values()) == pytest.approx([11.0, 11.0, 8.5, 8.5, 2.0])


def test_observe_updates_the_nearest_bucket_with_exponential_smoothing():
    t = CostTable.from_points({1: 100.0, 8: 50.0, 32: 20.0}, alpha=0.5)
    t.observe(7, 0.01)  # nearest is 8: 0.5 * 50 + 0.5 * 100
    assert t.points[8.0] == pytest.approx(75.0)
    assert t.points[1.0] == 100.0 and t.points[32.0] == 20.0
    t.observe(20, 0.1)  # |20-8| = |32-20| = 12: a tie goes to the smaller bucket (8)
    assert t.points[8.0] == pytest.approx(0.5 * 75 + 0.5 * 10)
    t.observe(1000, 0.1)  # beyond the end -> last bucket
    assert t.points[32.0] == pytest.approx(15.0)
    before = t.points
    t.observe(8, 0.0)  # nonsense timings are ignored
    t.observe(8, float("inf"))
    t.observe(0, 0.1)
    assert t.points == before


def test_observe_tracks_a_drifting_machine():
    t = CostTable.from_points({1: 100.0, 16: 40.0})  # default alpha 0.1
    for _ in range(200):
        t.observe(16, 1 / 25.0)
    assert t.sps(16) == pytest.approx(25.0, rel=1e-3)
    assert t.sps(1) == 100.0


def test_observe_from_a_writer_thread_while_reading():
    t = CostTable.from_points({1: 100.0, 64: 10.0})
    stop = threading.Event()
    seen = []

    def reader():
        while not stop.is_set():
            seen.append(t.sps(32))

    th = threading.Thread(target=reader)
    th.start()
    for _ in range(2000):
        t.observe(64, 0.05)
    stop.set()
    th.join()
    assert all(10.0 <= v <= 100.0 for v in seen)
    assert t.points[64.0] == pytest.approx(20.0, rel=1e-6)


KEY = {"model": "qwen3-4b", "dtype": "bfloat16", "device": "cpu", "threads": 8}


def test_save_and_load_round_trip(tmp_path):
    p = tmp_path / "sub" / "cost_table.json"
    t = CostTable.from_points({1: 100.0, 8: 60.5, 64: 12.25}, alpha=0.2)
    t.save(p, KEY)
    d = json.loads(p.read_text())
    assert d["format"] == "dspark-cost-table" and d["version"] == 1
    assert d["key"] == KEY and d["points"] == [[1.0, 100.0], [8.0, 60.5], [64.0, 12.25]]
    back = CostTable.load(p, dict(KEY))
    assert back is not None and back.points == t.points and back.alpha == 0.2


def test_load_returns_none_on_key_mismatch_or_missing_file(tmp_path):
    p = tmp_path / "cost_table.json"
    CostTable.from_points({1: 1.0}).save(p, KEY)
    for field, other in [("model", "llama"), ("dtype", "float32"), ("device", "cuda:0"), ("threads", 4)]:
        assert CostTable.load(p, {**KEY, field: other}) is None
    assert CostTable.load(tmp_path / "absent.json", KEY) is None


def test_save_needs_the_full_key_and_load_rejects_foreign_files(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        CostTable.from_points({1: 1.0}).save(tmp_path / "x.json", {"model": "m"})
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    with pytest.raises(ValueError):
        CostTable.load(bad, KEY)
    bad.write_text(json.dumps({"points": [[1, 2]]}))
    with pytest.raises(ValueError, match="dspark-cost-table"):
        CostTable.load(bad, KEY)


def test_default_grid_is_dense_where_small():
    assert default_grid(128) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]
    assert default_grid(100) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 100]
    assert default_grid(1) == [1]
    assert default_grid(5) == [1, 2, 3, 4, 5]


def test_profile_takes_the_median_of_repeats():
    calls = []
    noise = iter([0.0, 5.0, 0.0] * 100)  # one outlier per point; the median ignores it

    def run(b):
        calls.append(b)
        return 0.01 + 0.001 * b + next(noise)

    t = profile_cost_table(run, max_tokens=16, repeats=3, warmup=0)
    assert list(t.points) == [1, 2, 3, 4, 6, 8, 12, 16]
    for b, s in t.points.items():
        assert s == pytest.approx(1 / (0.01 + 0.001 * b))
    assert len(calls) == 8 * 3


def test_profile_times_the_callable_when_it_returns_none():
    import time

    def run(b):
        time.sleep(0.0005 * b)

    t = profile_cost_table(run, grid=[1, 8], repeats=1, warmup=1, smooth=True)
    assert t.sps(1) > t.sps(8) > 0


def test_observe_with_a_spread_moves_the_neighbours_towards_their_start_scaled_alike():
    t = CostTable.from_points({1: 100.0, 2: 80.0, 8: 50.0}, alpha=0.5, spread=1.0)
    t.observe(1, 1 / 120.0)  # bucket 1 observed 20% faster than it said
    assert t.points[1.0] == pytest.approx(110.0)  # its own update is the plain EMA, as without a spread
    w2, w8 = 0.5 * 0.5, 0.5 * 0.125  # alpha * exp(-ln(2) / 1), alpha * exp(-ln(8) / 1)
    assert t.points[2.0] == pytest.approx((1 - w2) * 80.0 + w2 * 1.2 * 80.0)
    assert t.points[8.0] == pytest.approx((1 - w8) * 50.0 + w8 * 1.2 * 50.0)
    t.observe(1, 1 / 120.0)  # the same timing again: r is against the start (100), not the current 110
    assert t.points[2.0] == pytest.approx((1 - w2) * ((1 - w2) * 80.0 + w2 * 96.0) + w2 * 96.0)
    assert t.copy().spread == 1.0 and t.smoothed().spread == 1.0
    with pytest.raises(ValueError):
        CostTable.from_points({1: 1.0}, spread=-1.0)


def test_a_spread_keeps_unvisited_buckets_in_line_with_the_visited_ones():
    # The machine became 25% faster than the profile; live steps only visit B = 1 and B = 8.
    profile = {1: 20.0, 2: 19.0, 4: 19.0, 8: 18.0}
    plain, spread = CostTable.from_points(profile), CostTable.from_points(profile, spread=1.0)
    for t in (plain, spread):
        for _ in range(300):
            t.observe(1, 1 / 25.0)
            t.observe(8, 1 / 22.5)
    # without a spread B=2 keeps its stale 19 next to a live 25: a 24% cliff between 1 and 2
    assert plain.sps(2) == pytest.approx(19.0) and plain.sps(1) == pytest.approx(25.0, rel=1e-3)
    assert spread.sps(1) == pytest.approx(25.0, rel=0.02) and spread.sps(8) == pytest.approx(22.5, rel=0.02)
    # with it they carry the same 25% as their visited neighbours: 19 * 1.25
    assert spread.sps(2) == pytest.approx(23.75, rel=0.02) and spread.sps(4) == pytest.approx(23.75, rel=0.02)


def test_the_profiled_shape_stays_while_live_steps_refresh_the_table():
    """`profiled_sps` is the curve as profiled: load-aware drafting reads its shape to price a plain
    step from a drafted step's measured seconds, whatever live steps did to the table since."""
    t = CostTable.from_points({1: 100.0, 8: 80.0, 64: 20.0}, alpha=0.5)
    for _ in range(20):
        t.observe(8, 1 / 40.0)  # the machine got twice as slow at B = 8
    assert t.sps(8) == pytest.approx(40.0, rel=1e-3)
    assert t.profiled_sps(8) == 80.0 and t.profiled_sps(4.5) == pytest.approx(90.0)
    assert t.profiled_sps(64) / t.profiled_sps(8) == pytest.approx(0.25)


def test_the_drafting_pass_curve_interpolates_extrapolates_learns_and_round_trips(tmp_path):
    t = CostTable({1: 50.0, 16: 10.0}, alpha=0.5, draft={1: 0.01, 4: 0.016, 16: 0.046})
    assert t.draft_seconds(1) == pytest.approx(0.01)
    assert t.draft_seconds(2) == pytest.approx(0.012)  # linear between 1 and 4
    assert t.draft_seconds(0.5) == pytest.approx(0.01)  # held below the first point
    assert t.draft_seconds(32) == pytest.approx(0.092)  # proportional beyond the last: a batch of blocks
    t.observe_draft(15, 0.056)  # within 4/3 of 16: EMA at 16
    assert t.draft_points[16] == pytest.approx(0.051)
    t.observe_draft(8, 1.0)  # 8 is a factor 2 from 4 and 16: no point learns it
    assert t.draft_points == {1: 0.01, 4: 0.016, 16: pytest.approx(0.051)}
    assert t.smoothed().draft_points == t.draft_points and t.copy().draft_points == t.draft_points
    key = {"model": "m", "dtype": "float32", "device": "cpu", "threads": 2}
    t.save(tmp_path / "t.json", key)
    back = CostTable.load(tmp_path / "t.json", key)
    assert back.draft_points == t.draft_points
    plain = CostTable({1: 50.0})
    assert plain.draft_seconds(4) is None and "draft" not in plain.to_dict()
    plain.observe_draft(4, 0.1)  # nothing profiled: nothing to learn into
    assert plain.draft_points == {}
    plain.replace(t)
    assert plain.draft_points == t.draft_points
    with pytest.raises(ValueError):
        CostTable({1: 50.0}, draft={0: 0.1})
