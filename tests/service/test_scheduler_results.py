"""The scheduler records what `run_study` returns: the status and the leaderboard rows come
from the study's result, read once, and stored specs are read as trusted data."""

from __future__ import annotations

from typing import Any

import pytest
import sqlalchemy as sa

from service import queue
from service.db import get_engine, migrate, session_scope
from service.models import ArmResult, StudyRecord, StudyStatus
from service.scheduler import Scheduler, SchedulerConfig
from worker.spec import StudySpec
from worker.summary import ArmSummary
from worker.sweep import StudyResult

SPEC = {"name": "rows", "task": "digits-mlp", "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}]}


def test_the_scheduler_stores_the_rows_run_study_returned(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    migrate(database_url)
    engine = get_engine(database_url)
    stored = StudySpec.model_validate(SPEC).model_dump(mode="json")
    del stored["version"]  # as specs were stored before they had versions
    with session_scope(engine) as session:
        study, _ = queue.submit(session, stored, name="rows", task="digits-mlp")
        study_id = study.id
    rows = [
        ArmSummary("adam", "adam", "val_accuracy", "maximize", objective_mean=0.9, n_trials=3),
        ArmSummary("sgd", "sgd", "val_accuracy", "maximize", objective_mean=0.8, n_trials=3),
    ]
    seen: list[StudySpec] = []

    def run_study(spec: StudySpec, storage_url: str, key: str, **_: Any) -> StudyResult:
        seen.append(spec)
        return StudyResult(key, rows, stopped=False, wall_time=1.0)

    def summarize_study(*_: Any) -> list[ArmSummary]:
        raise AssertionError("the scheduler recomputed the rows run_study returned")

    monkeypatch.setattr("worker.sweep.run_study", run_study)
    monkeypatch.setattr("worker.summary.summarize_study", summarize_study)
    config = SchedulerConfig(storage_url="unused", scheduler_id="rows")
    assert Scheduler(engine, config).run_once()

    assert seen[0].version == 1 and seen[0].labels == ["sgd", "adam"]
    with session_scope(engine) as session:
        record = session.get(StudyRecord, study_id)
        assert record is not None and record.status == StudyStatus.COMPLETED
        stored_rows = session.scalars(
            sa.select(ArmResult).where(ArmResult.study_id == study_id).order_by(ArmResult.rank)
        ).all()
        assert [(r.arm, r.objective_mean) for r in stored_rows] == [("adam", 0.9), ("sgd", 0.8)]
