"""A page of trials read in SQL (`service.optuna_tables`) is exactly what loading every trial
through Optuna's storage and slicing gave, for every page, arm filter and edge, on SQLite and
PostgreSQL; it costs a fixed number of queries whatever the page's size; and the tables it
declares are the installed Optuna's."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages._rdb import models as optuna_models
from optuna.trial import TrialState, create_trial

from service.app import create_app
from service.config import Settings
from service.db import get_engine, session_scope
from service.optuna_tables import OPTUNA_TABLES, trial_page
from service.schemas import Page, TrialOut
from tests.service.seeded import seed_finished_study
from worker.arms.base import final_study_name, sweep_study_name
from worker.results import load_trials
from worker.spec import StudySpec
from worker.storage import open_storage

STUDY = "paged"


def _extra_trials(url: str) -> None:
    """Trials beyond the seeded ones' shape: int and categorical params (stored as their
    internal representation), an infinite value, a trial still running (no end time)."""
    storage = open_storage(url)
    try:
        study = optuna.load_study(study_name=sweep_study_name(STUDY, "adam"), storage=storage)
        distributions = {
            "lr": FloatDistribution(1e-3, 1.0, log=True),
            "width": IntDistribution(16, 256, log=True),
            "nesterov": CategoricalDistribution([False, True]),
        }
        params = {"lr": 0.02, "width": 64, "nesterov": True}
        attrs = {"arm": "adam", "role": "sweep", "outcome": "complete", "lr": 0.02}
        study.add_trial(
            create_trial(state=TrialState.COMPLETE, value=float("-inf"), params=params,
                         distributions=distributions, user_attrs=attrs)
        )  # fmt: skip
        study.add_trial(
            create_trial(state=TrialState.RUNNING, params=params, distributions=distributions,
                         user_attrs={**attrs, "outcome": None})
        )  # fmt: skip
        # the final study of one arm has trials; the other arm's is still missing
        optuna.delete_study(study_name=final_study_name(STUDY, "sgd"), storage=storage)
    finally:
        storage.engine.dispose()


@pytest.fixture
def seeded(database_url: str) -> tuple[str, StudySpec]:
    spec = seed_finished_study(database_url, STUDY)
    _extra_trials(database_url)
    return database_url, spec


def _old_page(url: str, spec: StudySpec, arm: str | None, limit: int, offset: int) -> Page[Any]:
    """What the endpoint answered before it paged in SQL: every trial through Optuna, sliced."""
    trials = load_trials(url, STUDY, spec, arm=arm)
    items = []
    for t in trials[offset : offset + limit]:
        d = t.to_dict()
        for field in ("datetime_start", "datetime_complete"):
            if isinstance(d[field], datetime) and d[field].tzinfo is None:
                d[field] = d[field].astimezone()
        items.append(TrialOut.model_validate(d))
    return Page[TrialOut](items=items, total=len(trials), limit=limit, offset=offset)


def _new_page(url: str, spec: StudySpec, arm: str | None, limit: int, offset: int) -> Page[Any]:
    with session_scope(get_engine(url), read_only=True) as session:
        return trial_page(session, STUDY, spec.labels, arm, limit, offset)


def _dump(page: Page[Any]) -> list[dict[str, Any]]:
    """Items as comparable data: JSON where finite, and param order kept (the JSON's order)."""
    out = []
    for item in page.items:
        d = item.model_dump()
        d["param_order"] = list(item.params)
        out.append(d)
    return out


PAGES = [  # (arm, limit, offset): sgd's sweep is 0-4 (no final), adam's 5-11, its final 12-14
    (None, 50, 0),  # everything in one page
    (None, 1, 0),
    (None, 3, 1),  # inside the first arm's sweep
    (None, 4, 3),  # the first arm's sweep into the second arm's (sgd's final is missing)
    (None, 2, 5),
    (None, 7, 9),  # the second arm's sweep into its final seeds
    (None, 200, 13),  # to the end
    (None, 2, 14),  # the last trial alone
    (None, 5, 15),  # just past the end
    (None, 10, 10**6),
    (None, 1, 2**63 - 1),
    ("adam", 3, 0),
    ("adam", 4, 5),  # sweep into final
    ("adam", 50, 9),
    ("adam", 50, 10),  # past the end
    ("sgd", 50, 0),
    ("sgd", 2, 4),
    ("nope", 10, 0),  # no such arm: empty
]


@pytest.mark.slow
def test_every_page_is_what_loading_everything_gave(seeded: tuple[str, StudySpec]) -> None:
    url, spec = seeded
    everything = _old_page(url, spec, None, 200, 0)
    assert everything.total == 15  # sgd: 5 sweep, no final; adam: 7 sweep, 3 final
    assert spec.labels == ["sgd", "adam"]  # not alphabetical: order comes from the spec
    for arm, limit, offset in PAGES:
        old = _old_page(url, spec, arm, limit, offset)
        new = _new_page(url, spec, arm, limit, offset)
        where = f"arm={arm} limit={limit} offset={offset}"
        assert (new.total, new.limit, new.offset) == (old.total, old.limit, old.offset), where
        assert _dump(new) == _dump(old), where
    values = [t.value for t in _new_page(url, spec, "adam", 50, 0).items]
    assert float("-inf") in values and None in values  # the edge cases were exercised


def test_a_study_without_trials_yet_has_an_empty_page(database_url: str) -> None:
    """A queued study on a fresh database: Optuna has not even created its tables."""
    from service.db import migrate

    migrate(database_url)
    spec = StudySpec.model_validate(
        {"name": "q", "task": "mnist1d-mlp", "arms": [{"optimizer": "sgd"}],
         "search_space": {"lr": {"low": 1e-3, "high": 1.0, "log": True}}}
    )  # fmt: skip
    with session_scope(get_engine(database_url), read_only=True) as session:
        page = trial_page(session, "queued", spec.labels, None, 50, 0)
    assert (page.items, page.total) == ([], 0)


class _Statements:
    """Counts the SQL statements an engine executes (a real listener, not a stand-in)."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine, self.sql = engine, []

    def __enter__(self) -> list[str]:
        sa.event.listen(self.engine, "before_cursor_execute", self._seen)
        return self.sql

    def __exit__(self, *exc: object) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        self.sql.append(statement)


@pytest.fixture
def client(seeded: tuple[str, StudySpec], tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=seeded[0], data_dir=tmp_path, anonymous_reads=True)
    with TestClient(create_app(settings, start_ray=False)) as client:
        yield client


def test_the_endpoint_pages_with_a_fixed_number_of_queries(
    seeded: tuple[str, StudySpec], client: TestClient
) -> None:
    url, spec = seeded
    engine = client.app.state.engine  # type: ignore[attr-defined]
    client.get(f"/api/v1/studies/{STUDY}/trials")  # warm: the has-table check is made once
    counts = []
    for limit in (1, 2, 12):  # 12: every trial from offset 3 on
        with _Statements(engine) as sql:
            response = client.get(f"/api/v1/studies/{STUDY}/trials?limit={limit}&offset=3")
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["items"]) == limit
        expected = json.loads(
            _new_page(url, spec, None, limit, 3).model_dump_json()
        )  # what the module gives, through the endpoint's JSON
        assert body == expected
        counts.append(len([s for s in sql if s.lstrip().upper().startswith("SELECT")]))
    # the study's spec, the arms' trial counts, the page, its params, values and attributes
    assert counts == [6, 6, 6], counts  # not one more per trial
    missing = client.get("/api/v1/studies/none/trials")
    assert missing.status_code == 404


def test_the_declared_tables_are_optunas() -> None:
    """Names, columns and column kinds of the tables read here, against the installed
    Optuna's models; and the trial state is stored as the member's name."""
    theirs = optuna_models.BaseModel.metadata.tables
    for name, ours in OPTUNA_TABLES.tables.items():
        assert name in theirs, name
        for column in ours.columns:
            assert column.name in theirs[name].columns, f"{name}.{column.name}"
            their_type = theirs[name].columns[column.name].type
            if isinstance(their_type, sa.Enum):
                assert isinstance(column.type, sa.String), f"{name}.{column.name}"
            else:
                assert isinstance(their_type, type(column.type)) or isinstance(
                    column.type, type(their_type)
                ), f"{name}.{column.name}: {their_type!r} vs {column.type!r}"
    state = theirs["trials"].columns["state"].type
    assert isinstance(state, sa.Enum) and state.enum_class is TrialState
    assert "COMPLETE" in state.enums  # names, not values, are stored
    value_type = theirs["trial_values"].columns["value_type"].type
    assert isinstance(value_type, sa.Enum) and set(value_type.enums) == {
        "FINITE", "INF_POS", "INF_NEG"
    }  # fmt: skip
    assert theirs["trials"].columns["study_id"].index  # counting trials per study is indexed


def test_no_other_module_of_ours_reads_optunas_tables() -> None:
    """`service.optuna_tables` is the one owner of Optuna's private schema: every other module
    goes through Optuna's storage API (or this module), so a schema change of Optuna's breaks
    one module, which the test above pins. bench/api_scale.py, which seeds the tables in bulk
    to measure the API at scale, is a benchmark, not ratebench."""
    optuna_tables = {table.name for table in optuna_models.BaseModel.metadata.sorted_tables}
    names = "|".join(sorted(optuna_tables, key=len, reverse=True))
    declared = re.compile(rf"""\b(?:table|Table)\(\s*["']({names})["']""")
    in_sql = re.compile(rf"\b(?:FROM|JOIN|INTO|UPDATE)\s+({names})\b", re.IGNORECASE)
    root = Path(__file__).parents[2]
    owner = root / "service" / "optuna_tables.py"
    offenders = []
    for package in ("service", "worker", "optim"):
        for path in sorted((root / package).rglob("*.py")):
            if path == owner:
                continue
            text = path.read_text()
            for pattern in (declared, in_sql):
                offenders += [f"{path.relative_to(root)}: {m[0]}" for m in pattern.finditer(text)]
    assert offenders == []
    assert declared.search(owner.read_text())  # the patterns see a declaration where one is
