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
    source: str = Field("api", description="'api' (submitted) or 'cli' (`ratebench run`)")
    environment: dict[str, Any] | None = Field(
        None, description="versions and hardware of the host that ran it; `nodes`: its trials'"
    )
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
    node: dict[str, Any] | None = Field(
        None,
        description="the machine the trial ran on (its `node` attribute): `hostname`, Ray's "
        "node address `ip` and node id `ray_node_id`, `cpu`, `gpus`; null before it started",
    )


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
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="the stored summary's other fields (`worker.summary.ArmSummary`: per-seed "
        "`final_values`, test metrics, steps and time to target, rate band, trial counts, the "
        "searched range, `best_lr_at_edge`); the fields above are not repeated here",
    )


class StudyLeaderboard(BaseModel):
    study_id: str
    status: str
    arms: list[ArmRow]


class TaskArmRow(BaseModel):
    rank: int = Field(description="within its group, by the pooled mean (arms without one last)")
    arm: str
    scheme: str
    setting: str = Field(description="id of the arm's setting (`service.settings`)")
    setting_description: str = Field(description="what the arm sets beyond its group")
    fixed: dict[str, Any] = Field(description="the arm's fixed hyperparameters")
    model: dict[str, Any] = Field(description="the model options after the arm's overrides")
    studies: list[str] = Field(description="ids of the studies pooled in this row")
    n_seeds: int = Field(description="final seeds pooled across those studies")
    objective_mean: float | None = Field(description="mean of the pooled final seeds")
    confidence: float = Field(description="level of the interval")
    interval_low: float | None = Field(
        description="Student-t interval of the pooled seeds' mean, clipped to the metric's range "
        "(None below two seeds)"
    )
    interval_high: float | None
    objective_best: float | None = Field(description="the best study's final mean")
    best_lr: float | None = Field(description="rate of the study where the arm did best")
    best_study: str | None = Field(description="that study's id")
    n_trials: int
    n_diverged: int


class SettingGroup(BaseModel):
    id: str = Field(description="id of the group's setting: what its studies share")
    description: str
    setting: dict[str, Any] = Field(description="model, data, budget and objective")
    studies: list[str]
    arms: list[TaskArmRow]


class TaskLeaderboard(BaseModel):
    task: str
    metric: str
    direction: str
    filters: dict[str, Any] = Field(description="the filters applied")
    filter_values: dict[str, list[Any]] = Field(
        description="filters that would narrow this board (before filtering): their values"
    )
    groups: list[SettingGroup] = Field(
        description="one per setting, most studies first; rows pool only within a group"
    )
