"""Verification-length policies for speculative decoding (pure: numbers in, lengths out).

    from dspark_serve.scheduler import CostTable, PrefixScheduler
    table = CostTable.from_points({1: 50.0, 8: 45.0, 32: 30.0})
    lengths = PrefixScheduler(table).plan(confidences)          # list[int], one per request
"""

from .calibration import OnlineCalibrator, STSCalibrator, ece, reliability
from .cost_table import CostTable, default_grid, profile_cost_table
from .draft_budget import DraftBudget, DraftedSteps, DraftForecast, PlainSteps
from .policies import FixedPolicy, OffPolicy, VerifyPolicy, make_policy
from .prefix import AsyncPrefixScheduler, PlanResult, PrefixScheduler, ThresholdPolicy
from .skipping import DraftSkipper

__all__ = [
    "CostTable",
    "PrefixScheduler",
    "AsyncPrefixScheduler",
    "ThresholdPolicy",
    "FixedPolicy",
    "OffPolicy",
    "VerifyPolicy",
    "make_policy",
    "STSCalibrator",
    "OnlineCalibrator",
    "ece",
    "DraftSkipper",
    "DraftBudget",
    "DraftedSteps",
    "DraftForecast",
    "PlainSteps",
    # helpers
    "PlanResult",
    "profile_cost_table",
    "default_grid",
    "reliability",
]
