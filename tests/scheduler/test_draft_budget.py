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
