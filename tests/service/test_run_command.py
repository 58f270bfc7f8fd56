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


@pytest.mark.slow
def test_a_ray_that_cannot_be_joined_fails_the_claimed_study_in_one_line(tmp_path: Path) -> None:
    """Ray starts while the study is claimed (`service.local_run`): when Ray fails, the claimed
    row must not stay "running" under a lease nobody renews; it fails with Ray's error, and the
    user reads one line. Ray refuses an address whose port is not a number at once; one where
    nothing listens would do too, but Ray retries it for minutes. A process of its own: this
    one may already have joined the session's Ray runtime."""
    import os
    import subprocess
    import sys

    import sqlalchemy as sa

    database = f"sqlite:///{tmp_path / 'run.db'}"
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RATEBENCH_RAY_ADDRESS")}
    env["RATEBENCH_DATA_DIR"] = str(tmp_path / "data")
    args = ["run", str(_write(tmp_path, TINY)), "--database", database, "--study-key", "k"]
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", *args, "--ray-address", "127.0.0.1:noport"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "could not join Ray at 127.0.0.1:noport: ValueError: " in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    with sa.create_engine(database).connect() as db:
        status, error = db.execute(
            sa.text("SELECT status, error FROM ratebench_studies WHERE id = 'k'")
        ).one()
    assert status == "failed" and error.startswith("ValueError: Unable to parse port"), error


@pytest.mark.slow
@pytest.mark.parametrize("command", ["scheduler", "run"])
def test_an_unreachable_cluster_is_one_line_not_a_traceback(command: str, tmp_path: Path) -> None:
    """Ray's own client retries an address where nothing listens for many minutes; the
    commands check it first and say so in one line (exit 2)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a port nobody listens on: bound, never listening
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k not in ("RATEBENCH_RAY_ADDRESS",)}
        env.update(RAY_ADDRESS=address, RATEBENCH_DATA_DIR=str(tmp_path / "data"))
        args = [command] if command == "scheduler" else [command, str(_write(tmp_path, TINY))]
        result = subprocess.run(
            [sys.executable, "-m", "service.cli", *args], capture_output=True, text=True,
            env=env, timeout=300,
        )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert f"error: could not join Ray at {address}: ClusterUnreachableError: nothing answers" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr
