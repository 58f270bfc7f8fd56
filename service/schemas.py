"""Pydantic shapes of the API's responses (kept apart from the ORM rows they are read from)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from worker.report.stats import MIN_SEEDS_TO_TELL

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class StudyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: str
    name: str
    task: str
    status: str
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    error: str | None
    progress: dict[str, Any] | None = Field(
        None,
        description="per arm: trials complete / pruned / diverged / failed / running of the "
        "budget, best so far",
    )
    spec: dict[str, Any]
    warnings: list[str] = Field(
        default_factory=list,
        description="e.g. an arm whose best rate lies at an edge of its searched range",
    )


class SubmittedStudy(BaseModel):
    id: str
    status: str
    created: bool = Field(description="false when an Idempotency-Key matched an earlier study")
    location: str
    warnings: list[str] = Field(
        default_factory=list,
        description="what the study will run but not be able to tell, e.g. too few final seeds",
    )


class TrialOut(BaseModel):
    arm: str
    role: str = Field(description="'sweep' for the learning-rate sweep, 'final' for seed re-runs")
    number: int
    state: str
    outcome: str | None
    value: float | None
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    datetime_start: datetime | None
    datetime_complete: datetime | None


class ArmRow(BaseModel):
    rank: int
    arm: str
    scheme: str
    metric: str
    direction: str
    best_lr: float | None
    objective_mean: float | None
    objective_std: float | None
    test_mean: float | None
    n_trials: int
    n_diverged: int
    n_seeds: int = Field(0, description="final seeds with a value")
    confidence: float = Field(0.95, description="level of the interval and of Welch's test")
    interval_low: float | None = Field(
        None, description="Student-t interval of the seeds' mean, clipped to the metric's range"
    )
    interval_high: float | None = None
    ties: list[str] = Field(
        default_factory=list,
        description="arms Welch's test cannot separate from this one, each side with enough "
        "seeds for the test to have power",
    )
    too_few_seeds_to_tell: list[str] = Field(
        default_factory=list,
        description="arms the test cannot separate from this one because either has fewer "
        f"than {MIN_SEEDS_TO_TELL} final seeds: no evidence either way",
    )
    status: str = Field(
        "ok", description="'failed': every sweep trial or every final seed failed; no result"
    )
    error: str | None = Field(None, description="a failed arm's first error")
    summary: dict[str, Any]


class StudyLeaderboard(BaseModel):
    study_id: str
    status: str
    arms: list[ArmRow]


class TaskArmRow(BaseModel):
    arm: str
    scheme: str
    studies: int
    objective_mean: float | None = Field(description="mean over studies of the arm's final mean")
    objective_best: float | None
    best_lr: float | None = Field(description="rate of the study where the arm did best")
    n_trials: int
    n_diverged: int


class TaskLeaderboard(BaseModel):
    task: str
    metric: str
    direction: str
    arms: list[TaskArmRow]
