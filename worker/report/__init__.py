"""Reading results for people: fair-comparison statistics (and plots)."""

from worker.report.stats import RankedArm, mean_interval, performance_profile, rank_arms

__all__ = ["RankedArm", "mean_interval", "performance_profile", "rank_arms"]
