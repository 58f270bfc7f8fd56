"""Pydantic shapes of the API's responses (kept apart from the ORM rows they are read from)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field

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


class SubmittedStudy(BaseModel):
    id: str
    status: str
    created: bool = Field(description="false when an Idempotency-Key matched an earlier study")
    location: str


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
