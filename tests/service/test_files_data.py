"""Datasets from files (`files-*`, `files-regression-*` tasks): arrays numpy wrote, under the
data roots. Each malformed file is refused at submission with a 422 at `data.data_dir` that
names the file and what is wrong, and nothing is stored; no file is ever unpickled."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import session_scope
from service.models import StudyRecord


def _arrays(n: int = 60, classes: int = 3, features: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.standard_normal((n, features)).astype(np.float32),
        "y_train": np.arange(n) % classes,
        "x_test": rng.standard_normal((20, features)).astype(np.float32),
        "y_test": np.arange(20) % classes,
    }


class _Planted:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _save(folder: Path, **arrays: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "data.npz", **arrays)


def _valid(folder: Path) -> None:
    _save(folder, **_arrays())


def _missing_key(folder: Path) -> None:
    arrays = _arrays()
    del arrays["y_test"]
    _save(folder, **arrays)


def _unknown_key(folder: Path) -> None:
    _save(folder, **_arrays(), weights=np.ones(3))


def _ragged(folder: Path) -> None:
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    _save(folder, **arrays)


def _nan_inputs(folder: Path) -> None:
    arrays = _arrays()
    arrays["x_train"][7, 2] = np.nan
    _save(folder, **arrays)


def _negative_label(folder: Path) -> None:
    arrays = _arrays()
    arrays["y_train"][3] = -1
    _save(folder, **arrays)


def _float_labels(folder: Path) -> None:
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"].astype(np.float32)
    _save(folder, **arrays)


def _pickle_as_npz(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "data.npz").write_bytes(pickle.dumps({"x_train": _Planted(folder / "marker")}))


def _pickle_as_npy(folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, values in _arrays().items():
        np.save(folder / f"{name}.npy", values)
    (folder / "x_train.npy").write_bytes(pickle.dumps(_Planted(folder / "marker")))


def _object_array(folder: Path) -> None:
    arrays: dict[str, Any] = _arrays()
    arrays["x_test"] = np.array([_Planted(folder / "marker")] * 20, dtype=object)
    _save(folder, **arrays)


def _too_large(folder: Path) -> None:
    """A header that declares 300 million values (and no data behind it)."""
    folder.mkdir(parents=True)
    for name, values in _arrays().items():
        np.save(folder / f"{name}.npy", values)
    with (folder / "x_train.npy").open("wb") as f:
        header = {"descr": "<f4", "fortran_order": False, "shape": (60_000_000, 5)}
        np.lib.format.write_array_header_1_0(f, header)


def _link_out(folder: Path) -> None:
    outside = folder.parent.parent / "outside"
    _save(outside, **_arrays())
    folder.mkdir(parents=True)
    (folder / "data.npz").symlink_to(outside / "data.npz")


MALFORMED: dict[str, tuple[Callable[[Path], None], dict[str, Any], str]] = {
    # case: (writer, data options, what the message says after the file's path)
    "missing key": (_missing_key, {}, "data.npz: no y_test; expected x_train, y_train, "
                                      "x_test, y_test"),
    "unknown key": (_unknown_key, {}, "data.npz: unknown array 'weights'; expected x_train"),
    "ragged": (_ragged, {}, "data.npz: x_train has 60 examples and y_train 59; each input "
                            "needs one target"),
    "NaN input": (_nan_inputs, {}, "data.npz: x_train: NaN or infinite value at row 7"),
    "negative label": (_negative_label, {}, "data.npz: y_train: label -1 at row 3 is out of "
                                            "range; labels are 0 to 999"),
    "label over n_classes": (_valid, {"n_classes": 2},
                             "data.npz: y_train: label 2 at row 2 is out of range; labels are "
                             "0 to 1"),
    "float labels": (_float_labels, {}, "data.npz: y_train: labels are one integer per example"),
    "pickle as .npz": (_pickle_as_npz, {}, "data.npz is not a .npz archive (np.savez's format); "
                                           "it is never unpickled"),
    "pickle as .npy": (_pickle_as_npy, {}, "x_train.npy is not an array in numpy's .npy format"),
    "object array": (_object_array, {}, "data.npz: x_test: object arrays are refused"),
    "too large": (_too_large, {}, "values; at most 200,000,000"),
    "link out of the roots": (_link_out, {}, "data.npz is a link to a file outside the data "
                                             "roots"),
}  # fmt: skip


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "roots" / "data"
    folder.mkdir(parents=True)
    return folder


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


def _spec(task: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "from-files",
        "task": task,
        "data": {"batch_size": 8, **data},
        "model": {"width": 8, "depth": 1},
        "arms": [{"optimizer": "sgd"}],
        "budget": {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1},
    }


def _count(client: TestClient) -> int:
    engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(StudyRecord)).scalar_one())


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_malformed_file_is_422_naming_it_and_nothing_is_stored(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path, case: str
) -> None:
    client, headers = client_and_key
    write, options, expected = MALFORMED[case]
    folder = root / case.replace(" ", "-")
    write(folder)
    response = client.post(
        "/api/v1/studies",
        json=_spec("files-mlp", {"data_dir": folder.name, **options}),
        headers=headers,
    )
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "data", "data_dir"]
    assert expected in error["msg"], error["msg"]
    assert _count(client) == 0
    assert not (folder / "marker").exists()  # nothing was unpickled


def test_constant_regression_targets_are_refused(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path
) -> None:
    client, headers = client_and_key
    arrays = _arrays()
    _save(root / "flat", **{**arrays, "y_train": np.full(60, 2.5, np.float32),
                             "y_test": np.zeros(20, np.float32)})  # fmt: skip
    response = client.post("/api/v1/studies", headers=headers,
                           json=_spec("files-regression-mlp", {"data_dir": "flat"}))  # fmt: skip
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert "y_train: the targets do not vary" in error["msg"]
    assert _count(client) == 0


def test_well_formed_files_are_accepted_in_either_layout(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path
) -> None:
    client, headers = client_and_key
    _save(root / "npz", **_arrays())
    npy = root / "npy"
    npy.mkdir()
    rng = np.random.default_rng(1)
    for name, values in _arrays().items():
        if name.startswith("y_"):
            values = rng.standard_normal((len(values), 2)).astype(np.float32)
        np.save(npy / f"{name}.npy", values)
    for task, folder in (("files-mlp", "npz"), ("files-regression-resnet", "npy")):
        response = client.post(
            "/api/v1/studies", json=_spec(task, {"data_dir": folder}), headers=headers
        )
        assert response.status_code == 202, response.text
    stored = client.get("/api/v1/studies").json()["items"]
    assert {s["task"] for s in stored} == {"files-mlp", "files-regression-resnet"}
    regression = next(s for s in stored if s["task"] == "files-regression-resnet")
    assert regression["spec"]["objective"]["metric"] == "val_loss"


def test_a_convolutional_model_needs_image_files(
    client_and_key: tuple[TestClient, dict[str, str]], root: Path
) -> None:
    client, headers = client_and_key
    _save(root / "vectors", **_arrays())
    response = client.post("/api/v1/studies", headers=headers,
                           json=_spec("files-cnn", {"data_dir": "vectors"}))  # fmt: skip
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "data", "data_dir"]
    assert error["msg"] == "cnn needs images: inputs of shape [channels, height, width], not [5]"
