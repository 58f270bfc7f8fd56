"""The study leaderboard table, one function for `ratebench run` (rows it just computed) and
`ratebench leaderboard --study` (rows the API stored), so both print the same columns."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from service.cli._common import safe

__all__ = ["arm_table", "fmt"]


def fmt(value: Any, digits: int = 4) -> str:
    """A number in `digits` significant digits; '-' for none."""
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def _interval(row: dict[str, Any]) -> str:
    low, high = row.get("interval_low"), row.get("interval_high")
    return "-" if low is None or high is None else f"[{low:.4f}, {high:.4f}]"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _outcomes(row: dict[str, Any]) -> str:
    counts = (row.get(k) for k in ("n_complete", "n_pruned", "n_diverged", "n_failed"))
    return "/".join("-" if n is None else str(n) for n in counts)


def arm_table(spec: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Any:
    """A rich table of a study's arms, best first: rate, final-seed mean ± sd with its interval,
    test score, steps and time to target, the arm's training time (every trial), rate band,
    trial outcomes, and which arms the seeds cannot tell apart. `spec` is the study's spec as
    JSON; each row is an arm summary (`worker.summary.ArmSummary.to_dict()`, or a stored one
    with the API's interval, ties and rank on top)."""
    from rich.table import Table

    objective = spec.get("objective") or {}
    metric = objective.get("metric", "val_accuracy")
    level = round(100 * (rows[0].get("confidence") or 0.95)) if rows else 95
    table = Table(
        title=safe(
            f"{spec.get('name', '')} — {spec.get('task', '')}, ranked by {metric} over final seeds"
        )
    )
    for name in (
        "#", "arm", "best lr", "final mean ± sd", f"{level}% interval", "test", "steps→target",
        "time→target", "train time", "band (decades)", "trials ok/pruned/diverged/failed", "ties",
        "too few seeds to tell",
    ):  # fmt: skip
        left = name in ("arm", "ties", "too few seeds to tell")
        # headers stay whole on a narrow console; only the long trial-count one wraps
        width = None if name.startswith("trials") else len(name)
        table.add_column(name, justify="left" if left else "right", min_width=width)
    for r in rows:
        seconds = r.get("time_to_target_s")
        arm = safe(r["arm"])
        table.add_row(
            safe(r.get("rank", "-")),
            f"{arm} [red](failed)[/]" if r.get("status") == "failed" else arm,
            *(
                safe(cell)
                for cell in (
                    fmt(r.get("best_lr"), 3),
                    _pm(r.get("objective_mean"), r.get("objective_std")),
                    _interval(r),
                    _pm(r.get("test_mean"), r.get("test_std")),
                    fmt(r.get("steps_to_target"), 6),
                    "-" if seconds is None else f"{seconds:.1f} s",
                    _seconds(r.get("train_time_s")),
                    fmt(r.get("band_decades"), 2),
                    _outcomes(r),
                    ", ".join(r.get("ties") or []),
                    ", ".join(r.get("too_few_seeds_to_tell") or []),
                )
            ),
        )
    target = rows[0].get("target") if rows else None
    tolerance = objective.get("band_tolerance", 0.05)
    table.caption = safe(
        f"final mean ± sd: {metric} over the final seeds (the best sweep trial's value is "
        f"not the score); target {metric} = {fmt(target)}; train time: every trial of the arm "
        f"(a cohort's member counts 1/K of its time); band: rates within {tolerance:.0%} of "
        "the arm's best; interval clipped to the metric's range; ties: Welch's test cannot "
        "separate the arms; too few seeds to tell: it cannot because an arm has too few "
        "seeds, no evidence either way"
    )
    return table
