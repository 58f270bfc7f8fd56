"""ratebench's own tables (Optuna's sit beside them in the same database).

- `ratebench_studies`: the durable queue. A row is a submitted study; its `status` moves
  queued → running → completed | completed_with_errors | failed | cancelled. A scheduler owns
  a running row while its lease (`lease_expires_at`) is fresh; an expired lease means the
  scheduler died and the study may be claimed again, which resumes it from the Optuna storage.
  `source` says who runs it: "api" (submitted, run by a scheduler), "cli" (`ratebench run`,
  whose id is the run's study key and which only that command claims) or "python" (the Python
  API, `ratebench.compare`, which runs it in the caller's process as `ratebench run` does).
  `environment` records what ran it (`worker.environment.collect()` of the host that started
  it, the task's package and version under `task`, and under `nodes` the distinct machines its
  trials trained on). `attempts` counts the study's starts, and `faults` says what ended each
  attempt that did not finish (the scheduler gives up after `RATEBENCH_MAX_ATTEMPTS` of them,
  naming every cause). `public` lets every key read it where studies are private
  (`service.privacy`).
- `ratebench_arm_results`: one leaderboard row per arm of a finished study, written once, so
  leaderboards are aggregates over these rows and their cost does not grow with trials.
- `ratebench_api_keys`: API keys, stored as SHA-256 hashes (keys are 256-bit random tokens, so
  a fast hash suffices), revocable. An admin key may cancel any study; any other key only the
  studies it submitted (`ratebench_studies.api_key_id`).
- Idempotency keys are scoped per API key (unique on `(api_key_id, idempotency_key)`), and
  `spec_hash` (SHA-256 of the canonical body) tells a true retry from a conflicting one.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.db import UtcDateTime

__all__ = [
    "STUDY_ID_LENGTH",
    "STUDY_ID_PATTERN",
    "ApiKey",
    "ArmResult",
    "Base",
    "StudyRecord",
    "StudySource",
    "StudyStatus",
    "utcnow",
]

STUDY_ID_LENGTH = 100  # an API study's id is 32 hex digits; a `ratebench run` key may be longer
# Every study id: an API id (hex), a `ratebench run` key, an imported id. No `/` (Optuna study
# names are `<id>/<arm>`), no leading `.` (plot files live under `plots/<id>/`).
STUDY_ID_PATTERN = rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{STUDY_ID_LENGTH - 1}}}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute
        dict[str, Any]: sa.JSON,
        datetime: UtcDateTime(),  # aware (UTC) on SQLite as on PostgreSQL
    }


class StudyStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    COMPLETED_WITH_ERRORS = "completed_with_errors"  # some arms failed, others have results
    FAILED = "failed"  # every arm failed, or the study could not run
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self not in {StudyStatus.QUEUED, StudyStatus.RUNNING}


class StudySource(enum.StrEnum):
    API = "api"  # submitted to the API, run by a scheduler
    CLI = "cli"  # run by `ratebench run` in its own process; no scheduler claims it
    PYTHON = "python"  # run by the Python API (`ratebench.compare`) in the caller's process


class ApiKey(Base):
    __tablename__ = "ratebench_api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(100))
    key_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    prefix: Mapped[str] = mapped_column(sa.String(12))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)
    is_admin: Mapped[bool] = mapped_column(default=False, server_default=sa.false())


class StudyRecord(Base):
    __tablename__ = "ratebench_studies"
    __table_args__ = (
        sa.Index("ix_ratebench_studies_status_created", "status", "created_at"),
        sa.Index("ix_ratebench_studies_created", "created_at"),
        sa.Index("ix_ratebench_studies_task", "task"),
        sa.Index("ix_ratebench_studies_key_status", "api_key_id", "status"),
        sa.UniqueConstraint(
            "api_key_id", "idempotency_key", name="uq_ratebench_studies_key_idempotency"
        ),
    )

    id: Mapped[str] = mapped_column(sa.String(STUDY_ID_LENGTH), primary_key=True)
    name: Mapped[str] = mapped_column(sa.String(200))
    task: Mapped[str] = mapped_column(sa.String(100))
    spec: Mapped[dict[str, Any]]
    status: Mapped[str] = mapped_column(sa.String(32), default=StudyStatus.QUEUED.value)
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    idempotency_key: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    spec_hash: Mapped[str | None] = mapped_column(sa.String(64), default=None)
    api_key_id: Mapped[int | None] = mapped_column(
        sa.ForeignKey("ratebench_api_keys.id"), default=None
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    claimed_by: Mapped[str | None] = mapped_column(sa.String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    attempts: Mapped[int] = mapped_column(default=0)
    progress: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    error: Mapped[str | None] = mapped_column(sa.Text, default=None)
    source: Mapped[str] = mapped_column(
        sa.String(16), default=StudySource.API.value, server_default=StudySource.API.value
    )
    environment: Mapped[dict[str, Any] | None] = mapped_column(sa.JSON, default=None)
    # One entry per attempt that a fault ended ({"attempt", "at", "error"}): a scheduler that
    # died, a Ray runtime or actor lost, a cluster not ready (`service.queue.record_fault`).
    faults: Mapped[list[dict[str, Any]] | None] = mapped_column(sa.JSON, default=None)
    # Readable by every key where studies are private (`RATEBENCH_PRIVATE_STUDIES`).
    public: Mapped[bool] = mapped_column(default=False, server_default=sa.false())

    arm_results: Mapped[list[ArmResult]] = relationship(
        back_populates="study", cascade="all, delete-orphan", order_by="ArmResult.rank"
    )


class ArmResult(Base):
    __tablename__ = "ratebench_arm_results"
    __table_args__ = (
        sa.UniqueConstraint("study_id", "arm", name="uq_ratebench_arm_results_study_arm"),
        sa.Index("ix_ratebench_arm_results_task_scheme", "task", "scheme"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[str] = mapped_column(sa.ForeignKey("ratebench_studies.id", ondelete="CASCADE"))
    task: Mapped[str] = mapped_column(sa.String(100))
    arm: Mapped[str] = mapped_column(sa.String(100))
    scheme: Mapped[str] = mapped_column(sa.String(50))
    metric: Mapped[str] = mapped_column(sa.String(50))
    direction: Mapped[str] = mapped_column(sa.String(10))
    rank: Mapped[int] = mapped_column(default=0)
    best_lr: Mapped[float | None] = mapped_column(sa.Float, default=None)
    objective_mean: Mapped[float | None] = mapped_column(sa.Float, default=None)
    objective_std: Mapped[float | None] = mapped_column(sa.Float, default=None)
    test_mean: Mapped[float | None] = mapped_column(sa.Float, default=None)
    n_trials: Mapped[int] = mapped_column(default=0)
    n_diverged: Mapped[int] = mapped_column(default=0)
    summary: Mapped[dict[str, Any]]

    study: Mapped[StudyRecord] = relationship(back_populates="arm_results")
