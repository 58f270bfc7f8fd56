"""A study's trials as CSV and the whole study as a JSON bundle, on real SQLite files: the CSV
holds what the trials API holds, in both forms, with formula-like text defused; a bundle
exported through the API and imported into another database gives the same leaderboard and
trials there; a bad bundle or a taken id is refused in one line, writing nothing."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.cli import main
from service.config import Settings
from service.db import migrate
from service.models import StudyRecord
from tests.service.seeded import FORMULA_ERROR, seed_finished_study
from worker.storage import open_storage

STUDY = "exported"


def _client(url: str, data_dir: Path) -> TestClient:
    settings = Settings(database_url=url, data_dir=data_dir, anonymous_reads=True)
    return TestClient(create_app(settings, start_ray=False))


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The API on a SQLite file holding one finished, seeded study."""
    tmp = tmp_path_factory.mktemp("source")
    url = f"sqlite:///{tmp / 'source.db'}"
    seed_finished_study(url, STUDY)
    with _client(url, tmp) as client:
        yield client


def all_trials(client: TestClient, study_id: str) -> list[dict[str, Any]]:
    page = client.get(f"/api/v1/studies/{study_id}/trials", params={"limit": 200})
    assert page.status_code == 200, page.text
    body = page.json()
    assert body["total"] == len(body["items"])
    items: list[dict[str, Any]] = body["items"]
    return items


def read_csv(client: TestClient, form: str) -> list[dict[str, str]]:
    response = client.get(f"/api/v1/studies/{STUDY}/trials.csv", params={"form": form})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    return list(csv.DictReader(io.StringIO(response.text)))


def _num(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def test_wide_csv_has_a_row_per_trial_with_params_outcome_and_history(source: TestClient) -> None:
    trials = all_trials(source, STUDY)
    rows = read_csv(source, "wide")
    assert len(rows) == len(trials) == 2 * (5 + 3)
    for row, trial in zip(rows, trials, strict=True):
        assert (row["arm"], row["role"], int(row["trial"])) == (
            trial["arm"], trial["role"], trial["number"],
        )  # fmt: skip
        assert row["state"] == trial["state"]
        assert row["outcome"] == trial["outcome"]
        assert _num(row["objective"]) == trial["value"]
        assert _num(row["param_lr"]) == trial["params"]["lr"]
        attrs = trial["user_attrs"]
        assert _num(row["param_momentum"]) == attrs["fixed"].get("momentum")
        for record in attrs.get("history") or []:
            for metric in ("val_accuracy", "train_loss", "step"):
                assert _num(row[f"epoch_{record['epoch']}_{metric}"]) == record[metric]
        if trial["outcome"] == "pruned":  # stopped after two epochs: the third is empty
            assert row["epoch_3_val_accuracy"] == ""
        if trial["role"] == "final":
            assert _num(row["test_accuracy"]) == attrs["test_accuracy"]
        assert float(row["duration_s"]) >= 0
    assert {r["outcome"] for r in rows} == {"complete", "pruned", "diverged", "failed"}


def test_long_csv_has_a_row_per_trial_epoch_and_metric(source: TestClient) -> None:
    trials = all_trials(source, STUDY)
    rows = read_csv(source, "long")
    expected = []
    for t in trials:
        history = t["user_attrs"].get("history") or []
        cells = [(r["epoch"], m, v) for r in history for m, v in r.items() if m != "epoch"]
        for epoch, metric, value in cells or [(None, None, None)]:
            expected.append((t["arm"], t["role"], t["number"], epoch, metric, value))
    got = [
        (r["arm"], r["role"], int(r["trial"]), _num(r["epoch"]), r["metric"] or None,
         _num(r["value"]))
        for r in rows
    ]  # fmt: skip
    assert got == expected
    failed = [r for r in rows if r["outcome"] == "failed"]
    assert len(failed) == 2 and all(r["epoch"] == "" for r in failed)  # kept, without history


def test_csv_defuses_formula_like_text(source: TestClient) -> None:
    rows = read_csv(source, "wide")
    errors = [r["error"] for r in rows if r["outcome"] == "failed"]
    assert errors == ["'" + FORMULA_ERROR] * 2
    arm = source.get(f"/api/v1/studies/{STUDY}/trials.csv", params={"arm": "adam"})
    assert {r["arm"] for r in csv.DictReader(io.StringIO(arm.text))} == {"adam"}
    assert source.get("/api/v1/studies/nope/trials.csv").status_code == 404
    assert source.get(f"/api/v1/studies/{STUDY}/trials.csv?form=tall").status_code == 422


def _count(url: str) -> tuple[int, int]:
    """Studies in ratebench's table and Optuna studies in the database at `url`."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            studies = conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar()
            has_optuna = sa.inspect(conn).has_table("studies")
            optuna_studies = (
                conn.execute(sa.text("SELECT count(*) FROM studies")).scalar() if has_optuna else 0
            )
    finally:
        engine.dispose()
    return int(studies or 0), int(optuna_studies or 0)


def test_export_and_import_round_trip_into_another_database(
    source: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    response = source.get(f"/api/v1/studies/{STUDY}/export")
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert (bundle["format"], bundle["version"]) == ("ratebench-export", 1)
    assert bundle["study"]["id"] == STUDY and bundle["study"]["status"] == "completed"
    assert len(bundle["trials"]) == 4  # sweep and final seeds of two arms
    sweep = next(s for s in bundle["trials"] if s["study_name"] == f"{STUDY}/sgd")
    assert sweep["directions"] == ["MAXIMIZE"]
    assert sweep["trials"][0]["distributions"]["lr"]["name"] == "FloatDistribution"
    path = tmp_path / "bundle.json"
    path.write_text(response.text)

    target = f"sqlite:///{tmp_path / 'target.db'}"
    assert main(["import", str(path), "--database-url", target]) == 0
    assert f"imported study {STUDY}" in capsys.readouterr().out
    with _client(target, tmp_path) as copy:
        for path_ in ("", "/leaderboard"):
            original = source.get(f"/api/v1/studies/{STUDY}{path_}").json()
            imported = copy.get(f"/api/v1/studies/{STUDY}{path_}").json()
            assert imported == original
        assert all_trials(copy, STUDY) == all_trials(source, STUDY)
        again = copy.get(f"/api/v1/studies/{STUDY}/export").json()
    assert again == bundle

    # the same id again: refused in one line, nothing added
    assert main(["import", str(path), "--database", target]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"ratebench import: error: study {STUDY} already exists in this database; not imported"
    )
    assert _count(target) == (1, 4)


def _bundle(source: TestClient) -> dict[str, Any]:
    bundle: dict[str, Any] = source.get(f"/api/v1/studies/{STUDY}/export").json()
    return bundle


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda b: {**b, "format": "other"}, "not a ratebench export"),
        (lambda b: {**b, "version": 99}, "export version 99 is not supported"),
        (lambda b: {**b, "study": {**b["study"], "status": "running"}}, "only finished studies"),
        (lambda b: {k: v for k, v in b.items() if k != "arm_results"}, "missing 'arm_results'"),
        (lambda b: json.dumps(b)[:-40], "not valid JSON"),
    ],
    ids=["format", "version", "unfinished", "missing-part", "truncated"],
)
def test_a_bad_bundle_is_refused_in_one_line_and_nothing_is_written(
    source: TestClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: Any,
    message: str,
) -> None:
    changed = change(_bundle(source))
    path = tmp_path / "bad.json"
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    target = f"sqlite:///{tmp_path / 'target.db'}"
    assert main(["import", str(path), "--database-url", target]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "target.db").exists() or _count(target) == (0, 0)


def test_an_import_that_fails_half_way_leaves_nothing_behind(
    source: TestClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bundle.json"
    path.write_text(json.dumps(_bundle(source)))
    target = f"sqlite:///{tmp_path / 'target.db'}"
    migrate(target)  # a database that refuses the leaderboard rows, after the trials are in
    engine = sa.create_engine(target)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TRIGGER refuse BEFORE INSERT ON ratebench_arm_results "
            "BEGIN SELECT RAISE(ABORT, 'refused'); END"
        ))  # fmt: skip
    assert main(["import", str(path), "--database-url", target]) == 2
    assert "rows do not fit this database" in capsys.readouterr().err
    assert _count(target) == (0, 0)

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER refuse"))
    engine.dispose()
    storage = open_storage(target)  # the target already has one of the Optuna studies
    try:
        optuna.create_study(storage=storage, study_name=f"{STUDY}/adam/final")
    finally:
        storage.engine.dispose()
    path.write_text(json.dumps(_bundle(source)))
    assert main(["import", str(path), "--database-url", target]) == 2
    assert "already exists" in capsys.readouterr().err
    assert _count(target) == (0, 1)
