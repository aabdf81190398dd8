"""The in-engine load-aware benchmark's arithmetic and report (the engines themselves are
measured by `make bench-load-aware`, not in tests)."""

from __future__ import annotations

import pytest

from dspark_serve.loadtest.bench_load_aware import STATS, markdown, plot, summarise


def _run(tok_s, outputs, **stats):
    return {"tok_s": tok_s, "outputs": outputs, "budget_plain_steps": stats.pop("budget_plain_steps", 0),
            **{k: stats.get(k, 0) for k in STATS}}


def test_a_point_is_the_median_of_per_round_ratios_with_what_drafting_did(tmp_path):
    plain = [_run(100.0, [[1, 2]]), _run(200.0, [[1, 2]]), _run(100.0, [[1, 2]])]
    default = [_run(110.0, [[1, 2]], steps=10, spec_num_drafts=4, spec_num_accepted_tokens=6,
                    spec_num_proposed_tokens=12, spec_num_decode_steps=20, budget_plain_steps=3),
               _run(180.0, [[1, 2]], steps=10, spec_num_decode_steps=20),
               _run(95.0, [[1, 2]], steps=10, spec_num_decode_steps=20)]
    p = summarise(4, {"plain": plain, "default": default})
    # paired by round: 1.1, 0.9, 0.95 (not the ratio of medians, 110 / 100)
    assert p["ratios"] == pytest.approx([1.1, 0.9, 0.95]) and p["median_ratio"] == pytest.approx(0.95)
    assert p["positions_per_request_step"] == pytest.approx(12 / 60)
    assert p["tau"] == pytest.approx((6 + 4) / 4) and p["drafted_rows"] == 4
    assert p["budget_plain_steps"] == 3 and p["steps"] == 30 and p["same_output"]
    default[1]["outputs"] = [[1, 3]]
    assert not summarise(4, {"plain": plain, "default": default})["same_output"]
    res = {"command": "python -m dspark_serve.loadtest.bench_load_aware", "threads": 2, "new_tokens": 128, "rounds": 3,
           "machine": {"cpu": "cpu", "cores": 2, "torch": "2", "commit": "abc"}, "points": [p]}
    md = markdown(res)
    assert "| 4 | 100 / 200 / 100 | 110 / 180 / 95 | 1.10, 0.90, 0.95 | 0.950 | 0.20 | 4 | 2.50 | 3 of 30 | True |" in md
    plot(res, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0


def test_lockstep_keeps_each_engine_in_a_closed_loop_and_times_its_own_steps():
    """Each engine serves every prompt with at most `concurrency` in flight, a finished request
    replaced at once; the engines step alternately; each one's tok/s is over its own steps."""
    import time
    from types import SimpleNamespace

    from dspark_serve.loadtest.bench_load_aware import lockstep

    class Engine:
        def __init__(self, steps_per_request, seconds):
            self.steps_per_request, self.seconds = steps_per_request, seconds
            self.live, self.most, self.log = {}, 0, []
            self.stats = SimpleNamespace(snapshot=lambda: {"steps": len(self.log)})
            self.speculative = None

        def add_request(self, rid, prompt_token_ids, params):
            assert params.max_tokens == 3 and params.ignore_eos and params.temperature == 0
            self.live[rid] = [self.steps_per_request, list(prompt_token_ids)]
            self.most = max(self.most, len(self.live))

        def step(self):
            time.sleep(self.seconds)
            self.log.append(len(self.live))
            outs = []
            for rid in list(self.live):
                self.live[rid][0] -= 1
                if not self.live[rid][0]:
                    out = SimpleNamespace(token_ids=[self.live.pop(rid)[1][0]] * 3)
                    outs.append(SimpleNamespace(request_id=rid, finished=True, outputs=[out]))
            return outs

    fast, slow = Engine(2, 0.001), Engine(4, 0.004)
    got = lockstep({"plain": fast, "default": slow}, [[i] for i in range(10)], concurrency=3, new_tokens=3)
    assert fast.most == slow.most == 3 and got["plain"]["tokens"] == got["default"]["tokens"] == 30
    assert got["plain"]["outputs"] == got["default"]["outputs"] == [[i] * 3 for i in range(10)]  # in prompt order
    assert got["plain"]["steps"] == len(fast.log) == 8 and len(slow.log) == 16  # ceil(10/3) waves of 2 and 4 steps
    assert got["plain"]["tok_s"] > 2 * got["default"]["tok_s"]  # each over its own step seconds only
