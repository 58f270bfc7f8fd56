"""Task boards derive each study's settings once per process (`service.leaderboards`): the
same study id in two databases keeps each database's own settings, a later request answers
the same as the first, and a stored spec that no longer reads is its own group, left out when
a filter is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from service.db import get_engine, session_scope
from service.leaderboards import task_board
from service.models import StudyRecord
from tests.service.seeded import seed_finished_study

STUDY = "boarded"


def _board(url: str, **filters: Any) -> dict[str, Any]:
    with session_scope(get_engine(url), read_only=True) as session:
        board = task_board(session, "mnist1d-mlp", filters=filters)
    assert board is not None
    return board.model_dump(mode="json")


def _set_spec(url: str, change: dict[str, Any]) -> None:
    with session_scope(get_engine(url)) as session:
        study = session.get(StudyRecord, STUDY)
        assert study is not None
        session.execute(
            sa.update(StudyRecord)
            .where(StudyRecord.id == STUDY)
            .values(spec={**study.spec, **change})
        )


def test_each_database_keeps_its_own_settings_for_one_study_id(tmp_path: Path) -> None:
    one, two = (f"sqlite:///{tmp_path / name}.db" for name in ("one", "two"))
    for url in (one, two):
        seed_finished_study(url, STUDY)
    _set_spec(two, {"budget": {"trials_per_arm": 4, "epochs": 7, "final_seeds": 3}})
    first = _board(one)
    assert first["groups"][0]["setting"]["budget"]["epochs"] == 3
    assert _board(two)["groups"][0]["setting"]["budget"]["epochs"] == 7
    assert _board(one) == first  # answered from the cache: the same board
    assert _board(one, epochs=3)["groups"][0]["studies"] == [STUDY]
    assert _board(one, epochs=7)["groups"] == []


def test_an_unreadable_spec_is_its_own_group_and_never_matches_a_filter(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ratebench.db'}"
    seed_finished_study(url, STUDY)
    _set_spec(url, {"version": 10**6})
    board = _board(url)
    assert [g["id"] for g in board["groups"]] == ["unreadable"]
    assert {r["arm"] for r in board["groups"][0]["arms"]} == {"sgd", "adam"}
    assert _board(url, epochs=3)["groups"] == []
