"""Reading results for people: fair-comparison statistics (and plots)."""

from worker.report.stats import (
    MIN_SEEDS_TO_TELL,
    Profile,
    RankedArm,
    mean_interval,
    metric_range,
    performance_profile,
    rank_arms,
    seed_warning,
)

__all__ = [
    "MIN_SEEDS_TO_TELL",
    "Profile",
    "RankedArm",
    "mean_interval",
    "metric_range",
    "performance_profile",
    "rank_arms",
    "seed_warning",
]
