"""Objectives: pure (outputs, batch) -> (sum, count) metrics, combined by `compute_loss`."""

from solo.objectives.base import Metric, Metrics, Objective
from solo.objectives.core import (
    OBJECTIVES,
    active_objectives,
    compute_loss,
    denominators,
    forward,
    get_objective,
    model_heads,
    summarize,
)

__all__ = [
    "OBJECTIVES",
    "Metric",
    "Metrics",
    "Objective",
    "active_objectives",
    "compute_loss",
    "denominators",
    "forward",
    "get_objective",
    "model_heads",
    "summarize",
]
