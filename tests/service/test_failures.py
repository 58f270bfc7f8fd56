"""Failures and warnings that show: a deterministic error is tried once, its arm ends `failed`
with the error, and the study `completed_with_errors` (or `failed` when every arm failed); the
API's study and leaderboard and `ratebench status` all say so. A best rate at the edge of its
range is a warning in the API's study and in `ratebench run`.

The API is served by uvicorn on 127.0.0.1 in a thread (start_ray=False: no scheduler inside),
and the scheduler runs the queued study in the test on the session's Ray runtime. Two real
deterministic errors, both of the kind the submit-time checks cannot see:
- every arm: a cifar10 study whose data folder is there when the spec is accepted and gone when
  the workers load it;
- one arm: `sgd` searching `nesterov` over [true, false] without momentum. Each value is valid
  and the submit check builds the arm at its last value (false), so the spec is accepted; the
  seed is chosen so that the arm's only sweep trial draws `true`, which `optim.build` refuses.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
import threading
from collections.abc import Iterator
from contextlib import redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
import pytest
import uvicorn

from service.app import create_app
from service.auth import create_key
from service.cli import main as ratebench
from service.config import Settings
from service.db import get_engine, session_scope
from service.scheduler import Scheduler, SchedulerConfig
from tests.service.helpers import free_port, wait_for
from worker.arms.optuna.sampling import make_sampler, suggest
from worker.results import load_trials
from worker.spec import StudySpec

pytestmark = pytest.mark.ray

BROKEN = {
    "optimizer": "sgd",
    "label": "broken",
    "search_space": {"nesterov": {"values": [True, False]}},
}


@dataclass
class Api:
    url: str
    headers: dict[str, str]
    database_url: str
    data_root: Path

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def submit(self, spec: dict[str, Any]) -> str:
        response = httpx.post(
            f"{self.url}/api/v1/studies", json=spec, headers=self.headers, timeout=30
        )
        assert response.status_code == 202, response.text
        study_id: str = response.json()["id"]
        return study_id

    def run_queued_study(self) -> None:
        engine = get_engine(self.database_url)
        assert Scheduler(engine, SchedulerConfig(storage_url=self.database_url)).run_once()

    def status_command(self, study_id: str) -> str:
        out = io.StringIO()
        with redirect_stdout(out):
            assert ratebench(["status", study_id, "--url", self.url]) == 0
        return out.getvalue()


@pytest.fixture
def api(ray_runtime: None, ray_data_root: Path, database_url: str, tmp_path: Path) -> Iterator[Api]:
    """The service's data root is the Ray workers' (one folder per test under it)."""
    root = ray_data_root / tmp_path.name
    root.mkdir()
    settings = Settings(database_url=database_url, data_dir=tmp_path / "db", data_roots=str(root))
    app = create_app(settings, start_ray=False)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.config.port}"
    try:
        wait_for(lambda: server.started, 30, "the API server to start", interval=0.05)
        with session_scope(app.state.engine) as session:
            key = create_key(session, "tests").key
        yield Api(url, {"Authorization": f"Bearer {key}"}, database_url, root)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _spec(task: str, arms: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "failures",
        "task": task,
        "data": {"batch_size": 16, "n_train": 64, "n_val": 32, "n_test": 32},
        "model": {"width": 4, "depth": 1},
        "arms": arms,
        "search_space": {"lr": {"values": [0.05]}},
        "budget": {"trials_per_arm": 1, "epochs": 1, "final_seeds": 1},
        "sampler": "grid",
        "pruner": "none",
        "resources": {"cpus_per_trial": 0.5, "max_concurrent_trials": 2, "device": "cpu"},
    }
    spec.update(changes)
    return spec


def _seed_drawing_nesterov(spec: dict[str, Any]) -> int:
    """A seed whose first grid point for the broken arm has nesterov true (the sampler's own
    proposal, asked on an in-memory study)."""
    for seed in range(100):
        parsed = StudySpec.model_validate({**spec, "seed": seed})
        arm = next(a for a in parsed.arms if a.label == "broken")
        space = parsed.arm_search_space(arm)
        study = optuna.create_study(sampler=make_sampler(parsed, space, "sgd", seed))
        if suggest(study.ask(), space, "sgd")["nesterov"]:
            return seed
    raise AssertionError("no seed in 0..99 draws nesterov first")


def _write_cifar10(folder: Path) -> None:
    """The python-pickle layout, 20 images per data batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = [int(v) for v in rng.integers(0, 10, 20)]
        batch = {b"data": rng.integers(0, 256, (20, 3072), np.uint8), b"labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))


def _sweep_trials(api: Api, study_id: str, spec: dict[str, Any], arm: str) -> list[Any]:
    trials = load_trials(api.database_url, study_id, StudySpec.model_validate(spec), arm=arm)
    return [t for t in trials if t.role == "sweep"]


def test_a_failing_arm_is_tried_once_and_the_study_completes_with_errors(api: Api) -> None:
    spec = _spec("digits-mlp", [{"optimizer": "sgd", "label": "fine"}, BROKEN])
    spec["seed"] = _seed_drawing_nesterov(spec)
    study_id = api.submit(spec)
    api.run_queued_study()

    study = api.get(f"/studies/{study_id}")
    assert study["status"] == "completed_with_errors", study["error"]
    assert "arm broken failed: HyperparameterError" in study["error"]  # a ValueError: no retry
    assert "nesterov: needs momentum" in study["error"]
    arms = study["progress"]["arms"]
    assert arms["broken"]["status"] == "failed" and "nesterov" in arms["broken"]["error"]
    assert arms["fine"]["status"] == "done" and arms["fine"]["error"] is None

    (broken,) = _sweep_trials(api, study_id, spec, "broken")  # tried once: no retry
    assert broken.state == "FAIL" and broken.params["nesterov"] is True
    assert broken.user_attrs["deterministic"] is True and broken.user_attrs["attempt"] == 1

    board = api.get(f"/studies/{study_id}/leaderboard")
    assert board["status"] == "completed_with_errors"
    assert [(r["rank"], r["arm"], r["status"]) for r in board["arms"]] == [
        (1, "fine", "ok"),
        (2, "broken", "failed"),
    ]
    assert board["arms"][0]["objective_mean"] is not None
    assert board["arms"][1]["objective_mean"] is None and "nesterov" in board["arms"][1]["error"]

    page = httpx.get(f"{api.url}/studies/{study_id}", timeout=30).text
    assert 'broken <span class="status failed">failed</span>' in page
    task_board = api.get("/leaderboard?task=digits-mlp")  # the arms with results count
    rows = [(r["arm"], r["studies"]) for g in task_board["groups"] for r in g["arms"]]
    assert rows == [("fine", [study_id])]

    printed = api.status_command(study_id)
    assert "completed_with_errors" in printed
    assert "arm broken failed: HyperparameterError" in " ".join(printed.split())


def test_a_cifar10_study_whose_data_is_gone_at_run_time_fails(api: Api) -> None:
    folder = api.data_root / "cifar-10-batches-py"
    _write_cifar10(folder)
    arms = [{"optimizer": "sgd"}, {"optimizer": "adam"}]
    spec = _spec("cifar10-mlp", arms, data={"batch_size": 16, "data_dir": str(folder)})
    spec["budget"]["trials_per_arm"] = 2
    study_id = api.submit(spec)  # the data is there when the spec is checked
    shutil.rmtree(folder)
    api.run_queued_study()

    study = api.get(f"/studies/{study_id}")
    assert study["status"] == "failed"
    assert study["error"].startswith("arm sgd failed: FileNotFoundError: data.data_dir: no cifar10")
    for label in ("sgd", "adam"):
        arm = study["progress"]["arms"][label]
        assert arm["status"] == "failed", arm
        assert arm["error"].startswith("FileNotFoundError: data.data_dir: no cifar10"), arm["error"]
        trials = _sweep_trials(api, study_id, spec, label)
        assert len(trials) == 2  # each original once: a missing dataset is not retried
        assert all(t.state == "FAIL" and t.user_attrs["deterministic"] for t in trials)
    board = api.get(f"/studies/{study_id}/leaderboard")
    assert [r["status"] for r in board["arms"]] == ["failed", "failed"]
    assert "failed" in api.status_command(study_id)


def test_a_best_rate_at_the_top_of_a_narrow_range_is_a_warning(
    api: Api, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Rates this small only scratch the loss: the larger one lowers it more, so it wins.
    spec = _spec(
        "digits-mlp",
        [{"optimizer": "sgd"}],
        search_space={"lr": {"low": 0.001, "high": 0.003, "log": True}},
        objective={"metric": "val_loss"},
    )
    spec["budget"]["trials_per_arm"] = 2
    expected = "arm sgd: best lr 0.003 lies at the high edge of its range [0.001, 0.003]"

    study_id = api.submit(spec)
    api.run_queued_study()
    study = api.get(f"/studies/{study_id}")
    assert study["status"] == "completed"
    assert [w.split(";")[0] for w in study["warnings"]] == [expected]

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    capsys.readouterr()
    assert ratebench(["run", str(path), "--database-url", api.database_url, "--json"]) == 0
    out, err = capsys.readouterr()
    assert expected in " ".join(err.split())
    (row,) = json.loads(out)["arms"]  # the rows carry what the tables show
    assert (row["status"], row["error"], row["best_lr_at_edge"]) == ("ok", None, "high")
    assert {"interval_low", "interval_high", "ties", "too_few_seeds_to_tell"} <= set(row)
