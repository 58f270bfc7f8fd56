"""Pydantic shapes of the API's responses (kept apart from the ORM rows they are read from)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from worker.report.stats import MIN_SEEDS_TO_TELL

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
    limit: int
    offset: int


class StudyOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    @field_validator("faults", mode="before")
    @classmethod
    def _no_faults(cls, value: Any) -> Any:
        return [] if value is None else value

    id: str
    name: str
    task: str
    status: str
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int = Field(description="how many times the study was started (resumes count)")
    error: str | None
    faults: list[dict[str, Any]] = Field(
        default_factory=list,
        description="what ended each attempt that did not finish (`attempt`, `at`, `error`); "
        "the study was resumed after each",
    )
    progress: dict[str, Any] | None = Field(
        None,
        description="per arm: trials complete / pruned / diverged / failed / running of the "
        "budget, best so far",
    )
    spec: dict[str, Any]
    source: str = Field(
        "api",
        description="'api' (submitted), 'cli' (`ratebench run`) or 'python' (the Python API, "
        "`ratebench.compare`)",
    )
    public: bool = Field(
        False, description="readable by every key where studies are private (its owner sets it)"
    )
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
    schedule: dict[str, Any] | None = Field(
        None,
        description="the arm's learning-rate schedule (name, warm-up, its decay's fields; "
        "'searched' for a swept field); null: the constant rate",
    )
    target: float | None = Field(
        None, description="the objective's target for steps and time to target (the study's)"
    )
    steps_to_target: float | None = Field(
        None,
        description="median over the final seeds of the optimizer steps until the first epoch "
        "that met the target (null: more than half never did)",
    )
    time_to_target_s: float | None = Field(
        None, description="the same median in seconds of training and evaluation"
    )
    train_time_s: float | None = Field(
        None,
        description="seconds of training and evaluation of all the arm's trials, sweep and "
        "final seeds (a trial trained in a cohort of K is charged 1/K of the cohort's time)",
    )
    ms_per_step: float | None = Field(
        None, description="train_time_s per optimizer step, in milliseconds"
    )
    details: dict[str, Any] = Field(
        default_factory=dict,
        description="the stored summary's other fields (`worker.summary.ArmSummary`: per-seed "
        "`final_values`, test metrics, rate band, trial counts, the searched range, "
        "`best_lr_at_edge`, `cohort_sizes`); the fields above are not repeated here",
    )


class StudyLeaderboard(BaseModel):
    study_id: str
    status: str
    arms: list[ArmRow]


class TaskArmRow(BaseModel):
    rank: int = Field(description="within its group, by the pooled mean (arms without one last)")
    arm: str
    scheme: str
    setting: str = Field(description="id of the arm's setting (`service.comparability`)")
    setting_description: str = Field(description="what the arm sets beyond its group")
    fixed: dict[str, Any] = Field(description="the arm's fixed hyperparameters")
    model: dict[str, Any] = Field(description="the model options after the arm's overrides")
    schedule: dict[str, Any] | None = Field(
        None, description="the arm's learning-rate schedule; null: the constant rate"
    )
    studies: list[str] = Field(description="ids of the studies pooled in this row")
    n_seeds: int = Field(
        description="distinct final seeds pooled across those studies: each configuration and "
        "seed once (a re-run of the same configuration on the same seed is the same evidence)"
    )
    n_reruns: int = Field(
        0,
        description="final-seed values left out as re-runs of a configuration and seed "
        "already counted (the first stored value is kept)",
    )
    n_disagreeing: int = Field(
        0,
        description="of those re-runs, how many gave another value than the kept one "
        "(e.g. another machine or device)",
    )
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
