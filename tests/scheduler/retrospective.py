"""The negative control of the losslessness tests: Algorithm 1's ranking WITHOUT its early stop."""

from __future__ import annotations

from dspark_serve.scheduler.prefix import PlanResult, PrefixScheduler, as_rows, candidates


class RetrospectiveScheduler(PrefixScheduler):
    """The global argmax over prefixes of the ranking. NOT lossless (REFERENCE.md Appendix A):
    a[r][j+1], which depends on draft x_{r,j}, then decides whether x_{r,j} is verified. The tests
    use it to show that the distribution checks catch that bias."""

    name = "retrospective"

    def plan_with_stats(self, confidences, caps=None, base_tokens: int = 0, fixed_seconds: float = 0.0,
                        other_tokens: int = 0) -> PlanResult:
        rows = as_rows(confidences)
        result = self._search(rows, candidates(rows, caps), base_tokens, early_stop=False, fixed_seconds=fixed_seconds,
                              other_tokens=other_tokens)
        self.last = result
        return result
