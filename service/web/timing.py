"""How long a study has run and, while it runs, about how long it has left.

The estimate is the simplest one that is honest about what it knows: the time per finished
trial so far, times the trials left (`progress.trials_done` of `trials_total`, i.e. arms ×
(sweep trials + final seeds)). It is shown only once a trial has finished, and it is rough:
trials differ in length (pruned and diverged ones end early), and a resumed study's elapsed
time counts from its latest start while its finished trials include earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.models import StudyRecord, StudyStatus, utcnow

__all__ = ["StudyTiming", "duration", "study_timing"]


@dataclass(frozen=True)
class StudyTiming:
    elapsed_s: float
    done: int
    total: int
    left_s: float | None  # None: finished, or no trial finished yet


def study_timing(study: StudyRecord, now: datetime | None = None) -> StudyTiming | None:
    """The study's timing, or None before it started."""
    if study.started_at is None:
        return None
    finished = StudyStatus(study.status).finished
    end = study.finished_at if finished and study.finished_at is not None else now or utcnow()
    elapsed = max(0.0, (end - study.started_at).total_seconds())
    progress = study.progress or {}
    done, total = int(progress.get("trials_done", 0)), int(progress.get("trials_total", 0))
    left = None
    if not finished and done > 0:
        left = elapsed / done * max(0, total - done)
    return StudyTiming(elapsed, done, total, left)


def duration(seconds: float) -> str:
    """`42 s`, `3 min 5 s`, `25 min`, `2 h 7 min`: as precise as a reader of an estimate needs."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 600:
        return f"{s // 60} min {s % 60} s"
    if s < 3600:
        return f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"
