"""Speculative-decoding numbers from two scrapes of the server's /metrics (see docs/metrics.md).

Counters are cumulative, so a load point's numbers are the difference of a
scrape taken after it and one taken before it:

- tau (tokens per verification round) = (accepted + rounds) / rounds, where
  rounds = dspark_spec_decode_num_drafts_total (each round also emits the
  target's own next token);
- mean verification budget per request per round: the mean of the
  dspark_spec_decode_verify_length histogram (the scheduler's l_r, rounds where
  it chose 0 included); draft tokens / rounds when the histogram is absent;
- acceptance per position k: accepted at position k / rounds, and the same
  given that position k was verified (rounds with l_r >= k, from the
  histogram's buckets);
- acceptance rate: accepted / draft tokens.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

PREFIX = "dspark_spec_decode_"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_exposition(text: str) -> Samples:
    """{(sample name, sorted labels): value} of a Prometheus text exposition."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    return out


def delta(after: Samples, before: Samples | None) -> Samples:
    """after - before for every sample of `after` (counters; a gauge's difference is meaningless)."""
    before = before or {}
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def _value(d: Samples, name: str, **labels) -> float:
    return d.get((name, tuple(sorted(labels.items()))), 0.0)


def _series(d: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(lbls)[label]: v for (n, lbls), v in d.items() if n == name and label in dict(lbls)}


def spec_decode_stats(d: Samples) -> dict | None:
    """Speculation numbers of a counter delta; None when the server exposes none (a peer)."""
    if not any(name.startswith(PREFIX) for name, _ in d):
        return None
    rounds = _value(d, PREFIX + "num_drafts_total")
    accepted = _value(d, PREFIX + "num_accepted_tokens_total")
    draft_tokens = _value(d, PREFIX + "num_draft_tokens_total")
    proposed = _value(d, PREFIX + "num_proposed_tokens_total")
    decode_steps = _value(d, PREFIX + "num_decode_steps_total")
    per_pos = {int(k): v for k, v in _series(d, PREFIX + "num_accepted_tokens_per_pos_total", "position").items()}

    buckets = {float(le): v for le, v in _series(d, PREFIX + "verify_length_bucket", "le").items()}
    hist_count = _value(d, PREFIX + "verify_length_count")
    hist_sum = _value(d, PREFIX + "verify_length_sum")

    def rounds_verifying(k: int) -> float | None:
        """Rounds with l_r >= k: all rounds minus those with l_r <= k - 1 (None past the integer buckets)."""
        below = buckets.get(float(k - 1))
        return None if below is None or not hist_count else hist_count - below

    positions = sorted(p for p in per_pos if per_pos[p] > 0 or rounds)
    per_position = []
    for k in positions:
        verified = rounds_verifying(k)
        per_position.append({
            "position": k,
            "accepted": per_pos[k],
            "acceptance_per_round": per_pos[k] / rounds if rounds else None,
            "rounds_verifying": verified,
            "acceptance_given_verified": per_pos[k] / verified if verified else None,
        })
    if hist_count:
        budget = hist_sum / hist_count
    else:
        budget = draft_tokens / rounds if rounds else None
    return {
        "rounds": rounds,
        "rounds_scheduled": hist_count,  # includes rounds where the scheduler chose l_r = 0
        "proposed_tokens": proposed,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
        "tau": (accepted + rounds) / rounds if rounds else None,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_verify_budget": budget,
        # positions the drafter drafted per decoding request per step (load-aware drafting shrinks it)
        "mean_drafted_positions": proposed / decode_steps if decode_steps else None,
        "mean_verify_length_when_verifying": draft_tokens / rounds if rounds else None,
        # load-aware drafting: steps that drafted, steps the draft budget kept plain, its verdicts
        "drafted_steps": _value(d, PREFIX + "drafted_steps_total"),
        "budget_plain_steps": _value(d, PREFIX + "budget_plain_steps_total"),
        "budget_forecast_steps": _value(d, PREFIX + "budget_forecast_steps_total"),
        "budget_verdicts": {o: _value(d, PREFIX + "budget_verdicts_total", outcome=o) for o in ("paid", "lost")},
        "acceptance_per_position": per_position,
    }


def engine_stats(d: Samples) -> dict:
    """A few engine counters of the same delta, when the server has them."""
    errors = {dict(l).get("code"): v for (n, l), v in d.items() if n == "dspark_request_errors_total" and v}
    return {
        "generation_tokens": _value(d, "dspark_generation_tokens_total"),
        "prompt_tokens": _value(d, "dspark_prompt_tokens_total"),
        "preemptions": _value(d, "dspark_engine_preemptions_total"),
        "prefix_cache_queries": _value(d, "dspark_prefix_cache_queries_total"),
        "prefix_cache_hits": _value(d, "dspark_prefix_cache_hits_total"),
        # speed floors (--sla-min-tokens-per-s): steps that held the queue, drafts verified for floors
        "sla_admission_holds": _value(d, "dspark_sla_admission_holds_total"),
        "sla_floor_draft_tokens": _value(d, "dspark_sla_floor_draft_tokens_total"),
        "errors_by_code": errors,
    }


def summarize_scrapes(before_text: str | None, after_text: str | None) -> dict | None:
    """The metrics part of a result: spec-decode and engine deltas; None if /metrics was not readable."""
    if after_text is None:
        return None
    try:
        after = parse_exposition(after_text)
        before = parse_exposition(before_text) if before_text else None
    except ValueError:
        return None
    d = delta(after, before)
    has_engine = any(name.startswith("dspark_") for name, _ in d)
    return {
        "spec_decode": spec_decode_stats(d),
        "engine": engine_stats(d) if has_engine else None,
    }
