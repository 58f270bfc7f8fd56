"""`ratebench run`: a spec file in, the leaderboard out; spec mistakes as one line each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.cli import main

TINY: dict[str, Any] = {
    "name": "cli tiny",
    "task": "digits-mlp",
    "data": {"batch_size": 32, "n_train": 256, "n_val": 128, "n_test": 128},
    "model": {"width": 8, "depth": 1},
    "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}],
    "budget": {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1},
    "sampler": "random",
    "pruner": "none",
    "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 4, "device": "cpu"},
}


def _write(tmp_path: Path, data: Any) -> Path:
    path = tmp_path / "spec.json"
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def test_invalid_spec_prints_one_line_per_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = {**TINY, "arms": [{"optimizer": "foo"}], "budget": {"epochs": 0}}
    assert main(["run", str(_write(tmp_path, bad))]) == 2
    err = capsys.readouterr().err
    assert "is not a valid study spec" in err
    assert "  arms.0.optimizer: unknown scheme 'foo'; known: sgd" in err
    assert "  budget.epochs: " in err


def test_malformed_json_and_missing_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(_write(tmp_path, '{"name": '))]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "nope.json")]) == 2
    assert "cannot read" in capsys.readouterr().err


# A real run, its table and its resumption: tests/service/test_run_record.py.


def test_a_ray_that_fails_to_start_fails_the_claimed_study_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ray starts while the study is claimed (`_while_ray_starts`): when Ray fails, the claimed
    row must not stay "running" under a lease nobody renews; it fails with Ray's error, and the
    user reads one line. Ray's failure is the stand-in here: a start that fails on demand and
    at once cannot be had from Ray (joining an address where nothing listens retries for
    minutes)."""
    import sqlalchemy as sa

    from worker import cluster

    def failing_connect(address: str | None, **options: object) -> None:
        raise RuntimeError("The current node timed out during startup.")

    monkeypatch.setattr(cluster, "connect", failing_connect)
    monkeypatch.setenv("RATEBENCH_DATA_DIR", str(tmp_path / "data"))
    database = f"sqlite:///{tmp_path / 'run.db'}"
    spec = str(_write(tmp_path, TINY))
    assert main(["run", spec, "--database", database, "--study-key", "k"]) == 2
    err = capsys.readouterr().err
    assert "could not start a local Ray runtime: RuntimeError: The current node" in err, err
    assert "Traceback" not in err
    with sa.create_engine(database).connect() as db:
        status, error = db.execute(
            sa.text("SELECT status, error FROM ratebench_studies WHERE id = 'k'")
        ).one()
    assert (status, error) == ("failed", "RuntimeError: The current node timed out during startup.")
