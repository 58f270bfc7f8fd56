"""Submit-time checks of what a spec makes the service read and build: `data.data_dir` only
under the operator's data roots, the dataset's files present, each scheme buildable on the
task's model. Refusals are 422s naming the field, and nothing is stored; `ratebench run`
refuses the same specs."""

from __future__ import annotations

import copy
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.cli._common import CliError
from service.cli._run import load_spec
from service.config import Settings, get_settings
from service.db import session_scope
from service.models import StudyRecord

CIFAR_SPEC: dict[str, Any] = {
    "name": "cifar-paths",
    "task": "cifar10-cnn",
    "arms": [{"optimizer": "sgd"}],
    "budget": {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1},
}


def _write_cifar10(folder: Path) -> None:
    """The python-pickle layout, a few images per batch."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"x"] * 10}))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """The operator's data root, holding a CIFAR-10 copy; beside it, one outside the root."""
    _write_cifar10(tmp_path / "root" / "cifar-10-batches-py")
    _write_cifar10(tmp_path / "outside" / "cifar-10-batches-py")
    return tmp_path / "root"


@pytest.fixture
def client_and_key(
    database_url: str, tmp_path: Path, root: Path
) -> Iterator[tuple[TestClient, dict[str, str]]]:
    settings = Settings(database_url=database_url, data_dir=tmp_path / "db", data_roots=str(root))
    app = create_app(settings, start_ray=False)
    with TestClient(app) as client:
        with session_scope(app.state.engine) as session:
            key = create_key(session, "tests").key
        yield client, {"Authorization": f"Bearer {key}"}


def _submit(client: TestClient, headers: dict[str, str], **changes: Any) -> Any:
    spec = copy.deepcopy(CIFAR_SPEC)
    for name, value in changes.items():
        spec[name] = value
    return client.post("/api/v1/studies", json=spec, headers=headers)


def _count(client: TestClient) -> int:
    engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar_one())


def _only_error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    return dict(error)


def test_data_dir_outside_the_roots_is_422_and_says_nothing_of_existence(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path, tmp_path: Path
) -> None:
    client, headers = client_and_key
    messages = set()
    for data_dir in (
        str(tmp_path / "outside"),  # a real CIFAR copy, outside the root
        str(tmp_path / "outside" / "nothing-here"),
        "../outside",
        "/etc",
    ):
        error = _only_error(_submit(client, headers, data={"data_dir": data_dir}))
        assert error["loc"] == ["body", "data", "data_dir"]
        messages.add(error["msg"])
    assert len(messages) == 1, messages
    message = messages.pop()  # no server path: neither the roots nor the path it was given
    assert message.startswith("must name a folder under the data roots (<data root>;"), message
    assert str(tmp_path) not in message and "/etc" not in message
    assert _count(client) == 0
    for data_dir in (str(root), "cifar-10-batches-py"):  # absolute, or relative to the root
        response = _submit(client, headers, data={"data_dir": data_dir})
        assert response.status_code == 202, response.text
    assert _count(client) == 2


def test_missing_cifar_files_are_422_naming_the_folder_within_its_root(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path
) -> None:
    client, headers = client_and_key
    (root / "cifar-10-batches-py" / "test_batch").unlink()
    error = _only_error(_submit(client, headers, data={"data_dir": "cifar-10-batches-py"}))
    assert error["loc"] == ["body", "data", "data_dir"]
    # named relative to its root: the server's paths are never in an answer
    assert error["msg"] == "<data root>/cifar-10-batches-py lacks test_batch of cifar10"
    error = _only_error(_submit(client, headers, task="cifar100-cnn"))  # no data_dir, no CIFAR dir
    assert error["loc"] == ["body", "data", "data_dir"]
    assert "cifar100 needs a local copy of cifar-100-python" in error["msg"]
    assert "data roots (<data root>)" in error["msg"] and str(root) not in error["msg"]
    assert _count(client) == 0


def test_a_scheme_that_cannot_build_on_the_model_is_422_at_its_arm(
    client_and_key: tuple[TestClient, dict[str, str]],
) -> None:
    client, headers = client_and_key
    arms = [{"optimizer": "sgd"}, {"optimizer": "bmp_exact"}]
    error = _only_error(_submit(client, headers, arms=arms, data={"data_dir": "."}))
    assert error["loc"] == ["body", "arms", 1, "optimizer"]
    assert error["msg"].startswith("bmp_exact cannot train the cnn of cifar10-cnn: ")
    assert _count(client) == 0


def test_ratebench_run_refuses_the_same_paths(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(root))
    get_settings.cache_clear()
    try:
        spec_file = tmp_path / "spec.json"
        spec_file.write_text(json.dumps({**CIFAR_SPEC, "data": {"data_dir": "../outside"}}))
        with pytest.raises(CliError, match=r"\n  data\.data_dir: must name a folder under"):
            load_spec(spec_file)
        spec_file.write_text(
            json.dumps({**CIFAR_SPEC, "data": {"data_dir": "cifar-10-batches-py"}})
        )
        assert load_spec(spec_file).data.data_dir == "cifar-10-batches-py"
    finally:
        get_settings.cache_clear()
