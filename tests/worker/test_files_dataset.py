"""Training on files (worker.tasks.files): the worker reads the arrays under its own data roots,
uses a file's validation split when it has one, and checks the file again when it reads it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.runner import TrialConfig, run_trial
from worker.tasks import DataPathError
from worker.tasks.files import DataFileError


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "root"
    folder.mkdir()
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(folder))
    return folder


def _classes(folder: Path, with_validation: bool) -> None:
    """Three well-separated Gaussian classes in 4 dimensions."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((3, 4)) * 4

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 3, n)
        return (centres[y] + rng.standard_normal((n, 4))).astype(np.float64), y

    (x_train, y_train), (x_test, y_test), (x_val, y_val) = draw(300), draw(60), draw(40)
    folder.mkdir()
    extra = {"x_val": x_val, "y_val": y_val} if with_validation else {}
    np.savez(folder / "data.npz", x_train=x_train, y_train=y_train, x_test=x_test,
             y_test=y_test, **extra)  # fmt: skip


def _config(task: str, data_dir: str, **changes: object) -> TrialConfig:
    return TrialConfig(
        task=task,
        scheme="sgd",
        hyperparameters={"lr": 0.05, "momentum": 0.9},
        epochs=3,
        data={"batch_size": 20, "data_dir": data_dir},
        model={"width": 16, "depth": 1},
        **changes,  # type: ignore[arg-type]
    )


def test_a_classification_from_a_npz_trains_on_its_own_validation_split(root: Path) -> None:
    from worker.tasks import get_task, load_task_data

    _classes(root / "blobs", with_validation=True)
    data = load_task_data(get_task("files-mlp"), {"data_dir": "blobs", "val_fraction": 0.5})
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (300, 40, 60)
    assert data.n_classes == 3 and str(data.x_train.dtype) == "torch.float32"
    result = run_trial(_config("files-mlp", "blobs", evaluate_test=True))
    assert result.outcome == "complete" and result.value > 0.9
    assert result.test_accuracy is not None and result.test_accuracy > 0.9


def test_a_regression_from_npy_files_reports_no_accuracy(root: Path) -> None:
    folder = root / "line"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 200), ("test", 50)):
        x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
        np.save(folder / f"x_{split}.npy", x)
        np.save(folder / f"y_{split}.npy", (x @ np.array([2.0, -1.0, 0.5])).astype(np.float32))
    result = run_trial(_config("files-regression-mlp", "line", objective="val_loss"))
    assert result.outcome == "complete"
    assert result.history[-1].val_loss < result.history[0].val_loss
    assert all(r.val_accuracy is None for r in result.history)


def test_the_worker_checks_the_file_again_when_it_reads_it(root: Path) -> None:
    _classes(root / "changed", with_validation=False)
    config = _config("files-mlp", "changed")
    with np.load(root / "changed" / "data.npz") as f:
        arrays = dict(f)
    arrays["x_test"][5, 1] = np.inf  # the file changed after the study was submitted
    np.savez(root / "changed" / "data.npz", **arrays)
    expected = r"^data\.data_dir: .*data\.npz: x_test: NaN or infinite value at row 5"
    with pytest.raises(DataFileError, match=expected):
        run_trial(config)


def test_the_worker_refuses_a_folder_outside_its_roots(root: Path, tmp_path: Path) -> None:
    _classes(tmp_path / "elsewhere", with_validation=False)
    with pytest.raises(DataPathError, match="must name a folder under the data roots"):
        run_trial(_config("files-mlp", str(tmp_path / "elsewhere")))
