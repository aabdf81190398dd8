"""Sequential Temperature Scaling, ECE / reliability, the online calibrator."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from dspark_serve.scheduler import OnlineCalibrator, STSCalibrator, ece, reliability
from dspark_serve.scheduler.calibration import positions_from_rounds


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def synthetic_rounds(n, gamma, overconfidence, rng, verify="all"):
    """Rounds whose true conditional acceptance is sigmoid(z_k); the head reports logit = overconfidence * z_k.

    Returns (reported logits [n, gamma], drafts verified, drafts accepted)."""
    z = rng.normal(0.8, 1.5, size=(n, gamma))
    accept = rng.random((n, gamma)) < sigmoid(z)
    # accepted = length of the leading run of accepted positions (the first rejection stops the round)
    run = np.cumprod(accept, axis=1).sum(axis=1)
    if verify == "all":
        verified = np.full(n, gamma)
    else:  # chosen independently of the outcome (a non-anticipating scheduler)
        verified = rng.integers(1, gamma + 1, size=n)
    accepted = np.minimum(run, verified)
    return overconfidence * z, verified, accepted


def test_ece_and_reliability_by_hand():
    pred = [0.1, 0.1, 0.9, 0.9]
    out = [0, 1, 1, 1]
    # bins = 10: bin 1 holds (0.1, 0.1): |0.1 - 0.5| * 2/4 = 0.2; bin 9 holds (0.9, 0.9): |0.9 - 1| * 2/4 = 0.05
    assert ece(pred, out, bins=10) == pytest.approx(0.25)
    rel = reliability(pred, out, bins=10)
    assert rel["count"] == [0, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert rel["confidence"][1] == pytest.approx(0.1) and rel["accuracy"][1] == pytest.approx(0.5)
    assert rel["confidence"][9] == pytest.approx(0.9) and rel["accuracy"][9] == 1.0
    assert rel["confidence"][0] is None and rel["ece"] == pytest.approx(0.25)
    assert ece([1.0, 0.0], [1, 0]) == 0.0  # the edges fall in the first / last bin
    assert ece(torch.tensor([0.3, 0.3]), torch.tensor([0.0, 1.0]), bins=15) == pytest.approx(0.2)
    json.dumps(rel)  # publishable as is


def test_outcome_semantics():
    logits = np.arange(12, dtype=float).reshape(3, 4)
    # round 0: 3 verified, 1 accepted -> a_1 = 1, a_2 = 0, a_3 = 0, a_4 unobserved
    # round 1: 2 verified, 2 accepted -> a_1 = 1, a_2 = 1, a_3 / a_4 unobserved (not verified)
    # round 2: 4 verified, 0 accepted -> all four observed, all 0
    per = positions_from_rounds(logits, num_accepted=[1, 2, 0], num_verified=[3, 2, 4])
    labels = [list(y) for _, y in per]
    assert labels == [[1, 1, 0], [0, 1, 0], [0, 0], [0]]
    np.testing.assert_array_equal(per[2][0], logits[[0, 2], :3])  # a_3 uses logits 1..3 of rounds 0 and 2
    with pytest.raises(ValueError):
        positions_from_rounds(logits, num_accepted=[3, 0, 0], num_verified=[2, 4, 4])


def test_sts_recovers_overconfidence_and_calibrates_to_under_two_percent():
    rng = np.random.default_rng(0)
    gamma = 4
    train = synthetic_rounds(20000, gamma, 2.5, rng)
    test = synthetic_rounds(20000, gamma, 2.5, rng)
    cal = STSCalibrator().fit(*train[:1], num_accepted=train[2], num_verified=train[1])
    # ECE of a product is a flat objective at later positions, so T_k>1 is only loosely identified
    # (errors at k and k+1 compensate); T_1 is sharp. What must hold is the held-out ECE below.
    assert cal.temperatures[0] == pytest.approx(2.5, rel=0.1)
    assert cal.temperatures == pytest.approx([2.5] * gamma, rel=0.3)
    logits, _, accepted = test
    raw = np.cumprod(sigmoid(logits), axis=1)
    calibrated = cal.cumulative(logits)
    for k in range(gamma):
        label = accepted >= k + 1
        assert ece(raw[:, k], label) > 0.04  # overconfident before
        assert ece(calibrated[:, k], label) < 0.02, (k, cal.temperatures)
    # the fit's own report agrees
    assert all(b > a for b, a in zip(cal.ece_before, cal.ece_after))
    assert cal.num_samples == [20000] * gamma


def test_sts_with_partial_verification_still_recovers_the_temperatures():
    rng = np.random.default_rng(1)
    logits, verified, accepted = synthetic_rounds(30000, 3, 2.0, rng, verify="random")
    cal = STSCalibrator().fit(logits, accepted, verified)
    assert cal.temperatures == pytest.approx([2.0] * 3, rel=0.2)


def test_sts_is_order_preserving_and_applies_to_every_input_kind():
    cal = STSCalibrator([2.0, 0.5, 3.0])
    x = np.linspace(-6, 6, 41)
    grid = np.stack([x, x, x], axis=1)
    out = cal.apply(grid)
    assert isinstance(out, np.ndarray) and out.shape == grid.shape
    assert np.all(np.diff(out, axis=0) > 0)  # each position's order is kept
    np.testing.assert_allclose(out[:, 1], sigmoid(x / 0.5))
    t = cal.apply(torch.tensor(grid, dtype=torch.float32))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32
    np.testing.assert_allclose(t.numpy(), out, rtol=1e-5)
    lst = cal.apply([[0.0, 1.0, -1.0, 2.0]])  # a 4th position reuses the last temperature
    assert isinstance(lst, list) and isinstance(lst[0], list)
    assert lst[0] == pytest.approx([0.5, sigmoid(2.0), sigmoid(-1 / 3), sigmoid(2 / 3)])
    probs = cal.apply_probs([[sigmoid(2.0), 0.5, 0.5]])
    assert probs[0] == pytest.approx([sigmoid(1.0), 0.5, 0.5])
    assert STSCalibrator().apply([[0.0, 3.0]])[0] == pytest.approx([0.5, sigmoid(3.0)])  # unfitted = identity


def test_json_round_trip(tmp_path):
    rng = np.random.default_rng(2)
    logits, verified, accepted = synthetic_rounds(3000, 3, 1.7, rng)
    cal = STSCalibrator().fit(logits, accepted, verified)
    path = tmp_path / "calibration.json"
    text = cal.to_json(path)
    d = json.loads(path.read_text())
    assert json.loads(text) == d
    assert d["format"] == "dspark-sts-calibration" and d["version"] == 1
    assert d["method"] == "sequential_temperature_scaling"
    assert set(d) >= {"temperatures", "ece_before", "ece_after", "num_samples", "bins"}
    back = STSCalibrator.from_json(path)
    assert back.temperatures == cal.temperatures and back.ece_after == cal.ece_after
    assert STSCalibrator.from_json(text).temperatures == cal.temperatures
    with pytest.raises(ValueError):
        STSCalibrator.from_json('{"temperatures": [1.0]}')
    with pytest.raises(ValueError):
        STSCalibrator([0.0])


def test_positions_with_too_few_samples_inherit_the_previous_temperature():
    rng = np.random.default_rng(3)
    logits, _, accepted = synthetic_rounds(5000, 3, 2.0, rng)
    verified = np.where(np.arange(5000) < 20, 3, 1)  # positions 2 and 3 seen only 20 times
    accepted = np.minimum(accepted, verified)
    cal = STSCalibrator().fit(logits, accepted, verified, min_samples=50)
    assert cal.temperatures[1] == cal.temperatures[0] == cal.temperatures[2]
    assert cal.num_samples == [5000, 20, 20]


def feed(online, rounds):
    logits, verified, accepted = rounds
    for i in range(len(accepted)):
        online.record(logits[i], int(verified[i]), int(accepted[i]))


def test_online_calibrator_converges_follows_drift_and_stays_bounded():
    rng = np.random.default_rng(4)
    gamma = 3
    online = OnlineCalibrator(gamma, capacity=4096, refit_every=1024)
    assert online.temperatures == [1.0] * gamma  # identity until the first fit
    feed(online, synthetic_rounds(12000, gamma, 2.5, rng))
    assert online.num_fits == 12000 // 1024
    assert online.temperatures[0] == pytest.approx(2.5, rel=0.15)
    assert online.temperatures == pytest.approx([2.5] * gamma, rel=0.35)  # later T_k: see the STS test
    e = online.ece_by_position()
    assert all(a < 0.035 for a in e["after"]) and all(b > 0.04 for b in e["before"])
    assert online.buffered() == [4096] * gamma
    # The head gets retrained and becomes calibrated: the buffer forgets, T follows.
    feed(online, synthetic_rounds(12000, gamma, 1.0, rng))
    assert online.temperatures[0] == pytest.approx(1.0, rel=0.15)
    assert online.temperatures == pytest.approx([1.0] * gamma, rel=0.35)
    assert online.buffered() == [4096] * gamma  # still bounded
    assert [b.shape for b in online._logits] == [(4096, 1), (4096, 2), (4096, 3)]
    s = online.stats()
    json.dumps(s)
    assert s["num_recorded"] == 24000 and len(s["ece_after"]) == gamma
    rel = online.reliability(2)
    assert sum(rel["count"]) == 4096
    np.testing.assert_allclose(online.apply(np.zeros((2, gamma))), 0.5)


def test_online_calibrator_is_thread_safe_and_can_refit_in_the_background():
    rng = np.random.default_rng(5)
    # capacity 2048 of the 6000 rounds: which rounds the buffer keeps depends on how the threads
    # interleave, and with 512 a position's fitted T strayed past the tolerance now and then (2.77)
    online = OnlineCalibrator(2, capacity=2048, refit_every=1000, min_samples=50, background=True)
    chunks = [synthetic_rounds(1500, 2, 2.0, rng) for _ in range(4)]
    threads = [threading.Thread(target=feed, args=(online, c)) for c in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    online.wait()
    online.refit()
    assert online.num_recorded == 6000
    assert online.buffered() == [2048, 2048]
    assert online.num_fits >= 2
    assert online.temperatures == pytest.approx([2.0, 2.0], rel=0.35)


def test_online_calibrator_records_only_verified_positions():
    online = OnlineCalibrator(4, capacity=8, refit_every=10**6)
    online.record([1.0, 2.0, 3.0, 4.0], num_verified=2, num_accepted=1)
    online.record(torch.tensor([0.5, 0.5, 0.5, 0.5]), num_verified=0, num_accepted=0)
    assert online.buffered() == [1, 1, 0, 0]
    online.record_batch(torch.zeros(3, 4), [4, 4, 1], [4, 0, 1])
    assert online.buffered() == [4, 3, 2, 2]
    with pytest.raises(ValueError):
        online.record([0.0] * 4, num_verified=1, num_accepted=2)
