"""Fixtures of the worker tests: tiny CIFAR file sets in the real python-pickle layout, in the
test's temporary folder, which each fixture makes the data root (`RATEBENCH_DATA_ROOTS`)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest


def _write_pickle(path: Path, data: dict[bytes, object]) -> None:
    with path.open("wb") as f:
        pickle.dump(data, f)


@pytest.fixture
def cifar10_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`<tmp>/cifar-10-batches-py` as in cifar-10-python.tar.gz: five data batches of 4 images,
    a test batch of 6, and batches.meta."""
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 6)]:
        _write_pickle(
            folder / name,
            {
                b"batch_label": name.encode(),
                b"labels": [int(v) for v in rng.integers(0, 10, n)],
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"filenames": [f"{i}.png".encode() for i in range(n)],
            },
        )
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _write_pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return folder


@pytest.fixture
def cifar100_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`<tmp>/cifar-100-python` as in cifar-100-python.tar.gz: train (10), test (5), meta."""
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(tmp_path))
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 10), ("test", 5)):
        _write_pickle(
            folder / name,
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": [int(v) for v in rng.integers(0, 100, n)],
                b"coarse_labels": [int(v) for v in rng.integers(0, 20, n)],
            },
        )
    _write_pickle(folder / "meta", {b"fine_label_names": [b"x"] * 100})
    return folder
