"""Prometheus metrics: request latencies measured here, engine counters read at scrape time.

Every app owns its CollectorRegistry (tests build several apps in one
process; the global registry would reject the second). Engine-side numbers
(queue sizes, KV blocks, token and speculation counters) are not copied
into prometheus objects as they change: `EngineCollector` reads one
`engine.stats()` snapshot per scrape, so they cannot drift from the engine.
docs/metrics.md documents every family; a test checks the two agree.
"""

from __future__ import annotations

import asyncio
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from dspark_serve.engine import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0)
_TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
# Verification lengths are small integers (0 = plain decoding step, up to the draft length).
_VERIFY_LENGTH_BUCKETS = tuple(range(0, 17)) + (24, 32)


class ServerMetrics:
    def __init__(self, engine, info: dict[str, str]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_errors = Counter(
            "dspark_request_errors", "HTTP requests answered with an error, by HTTP status", ["code"], registry=r,
        )
        self.ttft = Histogram(
            "dspark_time_to_first_token_seconds", "Time from arrival to the first output token",
            buckets=_TTFT_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "dspark_inter_token_latency_seconds",
            "Time between consecutive outputs of a request, divided by the tokens the later one carries (one sample per token)",
            buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.tpot = Histogram(
            "dspark_time_per_output_token_seconds",
            "Per finished request: (finish - first token) / (output tokens - 1)",
            buckets=_TOKEN_LATENCY_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "dspark_e2e_request_latency_seconds", "Per finished request: time from arrival to the last token",
            buckets=_E2E_BUCKETS, registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "dspark_request_prompt_tokens", "Prompt length of finished requests",
            buckets=_TOKEN_COUNT_BUCKETS, registry=r,
        )
        self.request_generation_tokens = Histogram(
            "dspark_request_generation_tokens", "Output length of finished requests",
            buckets=_TOKEN_COUNT_BUCKETS, registry=r,
        )
        Info("dspark_model", "The served model and how it runs", registry=r).info(info)
        r.register(EngineCollector(engine))

    def watch_server(self, lifecycle) -> None:
        """Export the HTTP layer's own state (in-flight jobs, asyncio tasks): leaks show there."""
        self.registry.register(ServerCollector(lifecycle))

    def count_error(self, status: int) -> None:
        self.request_errors.labels(code=str(status)).inc()

    def request_timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Latency bookkeeping of one engine request, fed with each output as it arrives."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self._last_output: float | None = None

    def on_output(self, out: RequestOutput, now: float) -> None:
        comp = out.outputs[0]
        n = len(comp.delta_token_ids)
        if n:
            if self._last_output is None:
                t = out.metrics.get("first_token_time")
                start = out.metrics.get("arrival_time")
                if t is not None and start is not None:
                    self.m.ttft.observe(max(0.0, t - start))
            else:
                # A speculative step can emit several tokens at once: spread the gap over them.
                per_token = (now - self._last_output) / n
                for _ in range(n):
                    self.m.itl.observe(per_token)
            self._last_output = now
        if out.finished and comp.finish_reason in ("stop", "length"):
            m = out.metrics
            arrival, first, finish = m.get("arrival_time"), m.get("first_token_time"), m.get("finish_time")
            num_out = len(comp.token_ids)
            if arrival is not None and finish is not None:
                self.m.e2e.observe(max(0.0, finish - arrival))
            if first is not None and finish is not None and num_out > 1:
                self.m.tpot.observe(max(0.0, finish - first) / (num_out - 1))
            self.m.request_prompt_tokens.observe(len(out.prompt_token_ids))
            self.m.request_generation_tokens.observe(num_out)


class ServerCollector:
    """Gauges of the HTTP layer, read at scrape time (on the event loop: /metrics is async)."""

    def __init__(self, lifecycle):
        self.lifecycle = lifecycle

    def collect(self):
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:  # rendered outside a running loop (unit tests)
            tasks = 0
        yield GaugeMetricFamily("dspark_server_requests_in_flight",
                                "Generation requests the HTTP layer is serving (streams included)",
                                value=len(self.lifecycle.jobs))
        yield GaugeMetricFamily("dspark_server_asyncio_tasks", "asyncio tasks alive in the server's event loop",
                                value=tasks)


class EngineCollector:
    """Exposes one `engine.stats()` snapshot per scrape as gauges, counters and a histogram."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s: dict[str, Any] = self.engine.stats()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        used, total = s["kv_used_blocks"], s["kv_total_blocks"]
        yield gauge("dspark_num_requests_running", "Requests in the running batch", s["num_running"])
        yield gauge("dspark_num_requests_waiting", "Requests waiting for admission", s["num_waiting"])
        yield gauge("dspark_kv_cache_used_blocks", "KV cache blocks in use", used)
        yield gauge("dspark_kv_cache_total_blocks", "KV cache blocks in the pool", total)
        yield gauge("dspark_kv_cache_usage_ratio", "Fraction of KV cache blocks in use", used / total if total else 0.0)

        success = CounterMetricFamily(
            "dspark_request_success", "Engine requests finished, by finish reason", labels=["finish_reason"],
        )
        finished = dict(s.get("finished", {}))
        for reason in ("stop", "length"):
            finished.setdefault(reason, 0)
        finished["abort"] = s.get("aborted", 0)
        for reason, count in sorted(finished.items()):
            success.add_metric([reason], count)
        yield success

        yield counter("dspark_prompt_tokens", "Prompt tokens of requests, each once (prefilled or from the prefix cache; recomputation after preemption excluded)",
                      s["prompt_tokens"])
        yield counter("dspark_generation_tokens", "Output tokens generated", s["generation_tokens"])
        yield counter("dspark_prefix_cache_queries", "Prefix caching: tokens of admitted requests looked up in "
                      "the cache (preempted requests again at resumption)", s.get("prefix_cache_queries", 0))
        yield counter("dspark_prefix_cache_hits", "Prefix caching: of those tokens, the ones found cached (their "
                      "KV and drafter context reused, not computed)", s.get("prefix_cache_hits", 0))
        yield gauge("dspark_kv_cache_cached_blocks", "KV cache blocks holding a cached prompt prefix (in use or "
                    "free; free ones are evicted least recently used first)", s.get("kv_cached_blocks", 0))
        yield gauge("dspark_compiled_graphs", "Shape classes of the decode step compiled so far (0 to 4; they compile "
                    "in the background after start-up, 0 with --enforce-eager)", s.get("compiled_graphs", 0))
        yield gauge("dspark_compiling", "1 while the decode step's graphs compile in the background (steps of a "
                    "class not compiled yet run eager, slower) and until the cost table is re-profiled on them "
                    "(at the first idle moment)", s.get("compiling", 0))
        yield gauge("dspark_sla_default_floor_tokens_per_s", "The server's speed floor per request "
                    "(--sla-min-tokens-per-s; 0: none; a request may set its own with min_tokens_per_s)",
                    s.get("sla_default_floor", 0.0))
        yield gauge("dspark_sla_requests_below_floor", "Running requests whose decode speed so far (tokens/s after "
                    "the first token) is below their floor", s.get("sla_requests_below_floor", 0))
        sla = CounterMetricFamily("dspark_sla_requests", "Finished requests with a speed floor, by whether their "
                                  "decode speed met it", labels=["outcome"])
        sla.add_metric(["met"], s.get("sla_requests_met", 0))
        sla.add_metric(["missed"], s.get("sla_requests_missed", 0))
        yield sla
        ratio = s.get("sla_attainment_ratio")
        yield gauge("dspark_sla_floor_attainment_ratio", "Share of the last 200 finished requests with a floor "
                    "that met it (1 before any)", 1.0 if ratio is None else ratio)
        yield counter("dspark_sla_floor_draft_tokens", "Drafts the plan verified for requests below their floor "
                      "(weighted by it in Algorithm 1's objective)", s.get("sla_floor_draft_tokens", 0))
        yield counter("dspark_sla_admission_holds", "Engine steps in which the speed floors kept a waiting request "
                      "waiting (one more would have pushed the predicted per-user speed below the tightest floor)",
                      s.get("sla_admission_holds", 0))
        yield counter("dspark_engine_preemptions", "Requests preempted (KV blocks freed, recomputed later)",
                      s["preemptions"])

        yield counter("dspark_spec_decode_num_drafts", "Speculative verification rounds, summed over requests",
                      s.get("spec_num_drafts", 0))
        yield counter("dspark_spec_decode_num_proposed_tokens", "Tokens proposed by the drafter",
                      s.get("spec_num_proposed_tokens", 0))
        yield counter("dspark_spec_decode_num_decode_steps", "Decoding requests summed over engine steps (each "
                      "could have drafted): num_proposed_tokens / this = positions drafted per request per step",
                      s.get("spec_num_decode_steps", 0))
        yield counter("dspark_spec_decode_drafted_steps", "Engine steps that ran the drafting pass",
                      s.get("spec_drafted_steps", 0))
        yield counter("dspark_spec_decode_budget_plain_steps", "Engine steps with decoding requests that the "
                      "load-aware draft budget kept from drafting (recent drafted steps did not pay, or its "
                      "forecast said drafting could not)",
                      s.get("spec_budget_plain_steps", 0))
        yield counter("dspark_spec_decode_budget_forecast_steps", "Steps the draft budget's forecast kept from "
                      "drafting: at this load no acceptance seen so far could pay for the drafting pass",
                      s.get("spec_budget_forecast_steps", 0))
        verdicts = CounterMetricFamily("dspark_spec_decode_budget_verdicts", "Drafted steps judged by the draft "
                                       "budget, by whether drafting beat the same rows decoded plainly",
                                       labels=["outcome"])
        for outcome in ("paid", "lost"):
            verdicts.add_metric([outcome], s.get("spec_budget_verdicts", {}).get(outcome, 0))
        yield verdicts
        yield counter("dspark_spec_decode_num_draft_tokens", "Drafted tokens sent to verification",
                      s.get("spec_num_draft_tokens", 0))
        yield counter("dspark_spec_decode_num_accepted_tokens", "Drafted tokens accepted by verification",
                      s.get("spec_num_accepted_tokens", 0))
        yield counter("dspark_spec_decode_lookup_num_drafts", "Verification rounds whose draft was copied from "
                      "the request's context (context lookup) instead of drafted by the drafter",
                      s.get("spec_lookup_num_drafts", 0))
        yield counter("dspark_spec_decode_lookup_num_draft_tokens", "Context-lookup tokens sent to verification",
                      s.get("spec_lookup_num_draft_tokens", 0))
        yield counter("dspark_spec_decode_lookup_num_accepted_tokens", "Context-lookup tokens accepted by verification",
                      s.get("spec_lookup_num_accepted_tokens", 0))
        yield counter("dspark_structured_requests", "Requests admitted with an output constraint (response_format, "
                      "structured_outputs, guided_*, a forced tool call)", s.get("structured_requests", 0))
        yield counter("dspark_grammar_compiles", "Grammars compiled (the cache missed)", s.get("grammar_compiles", 0))
        yield counter("dspark_grammar_compile_seconds", "Seconds spent compiling grammars",
                      s.get("grammar_compile_seconds", 0.0))
        yield counter("dspark_grammar_mask_tokens", "Token masks applied to the target's logits (one per "
                      "constrained position sampled or verified)", s.get("grammar_mask_rows", 0))
        yield counter("dspark_grammar_mask_seconds", "Seconds computing and applying those masks: / "
                      "dspark_grammar_mask_tokens = mask time per token", s.get("grammar_mask_seconds", 0.0))
        yield counter("dspark_grammar_mask_blocking_seconds", "Of those, seconds the engine step waited on "
                      "(the rest ran on a worker thread during the forward)", s.get("grammar_mask_blocking_seconds", 0.0))
        per_pos = CounterMetricFamily(
            "dspark_spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by draft position (1-based)",
            labels=["position"],
        )
        for k, count in enumerate(s.get("spec_accepted_per_pos", [])):
            per_pos.add_metric([str(k + 1)], count)
        yield per_pos

        yield gauge("dspark_spec_decode_expected_tokens", "Tokens the verification plan expected in the last "
                    "speculative step (sum over requests of 1 + the survival probabilities verified)",
                    s.get("spec_last_expected_tokens", 0.0))
        yield gauge("dspark_spec_decode_realised_tokens", "Tokens the drafted requests produced in the last "
                    "speculative step (accepted drafts + 1 each)", s.get("spec_last_realised_tokens", 0))
        yield gauge("dspark_spec_decode_planned_batch_tokens", "Tokens B in the verify forward chosen by the "
                    "last plan", s.get("spec_last_planned_tokens", 0))
        yield gauge("dspark_spec_decode_cost_table_sps", "Cost-table steps per second SPS(B) at the chosen B",
                    s.get("spec_last_sps", 0.0))
        yield gauge("dspark_spec_decode_capacity", "Verification capacity K of the async policy this step",
                    s.get("spec_capacity", 0))
        cal = s.get("spec_calibration_ece") or {}
        if True:  # always exposed (empty without speculation), so dashboards never see it vanish
            ece = GaugeMetricFamily("dspark_spec_decode_calibration_ece",
                                    "Expected calibration error of the survival probability a_k on recent "
                                    "verification rounds, raw or after (online) temperature scaling, per "
                                    "acceptance rule (mode: greedy or sampled requests)",
                                    labels=["position", "kind", "mode"])
            for mode, by_kind in cal.items():
                for kind in ("before", "after"):
                    for k, v in enumerate(by_kind.get(kind) or [], start=1):
                        if v is not None:
                            ece.add_metric([str(k), "raw" if kind == "before" else "calibrated", mode], v)
            yield ece

        counts = {int(k): v for k, v in s.get("spec_verify_length_counts", {}).items()}
        buckets = [(str(float(le)), sum(v for length, v in counts.items() if length <= le))
                   for le in _VERIFY_LENGTH_BUCKETS]  # cumulative, as Prometheus buckets are
        total_rounds = sum(counts.values())
        buckets.append(("+Inf", total_rounds))
        yield HistogramMetricFamily(
            "dspark_spec_decode_verify_length", "Drafted tokens verified per round (the scheduler's l_r)",
            buckets=buckets, sum_value=sum(length * v for length, v in counts.items()),
        )
