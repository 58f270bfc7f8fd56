"""Datasets, all offline: generated (`mnist1d`, `synthetic`), bundled (`digits`) or local files
(`cifar10`, `cifar100`).

Every dataset yields a fixed test set and a training pool; the validation set is cut from the
training pool by `split_seed`, so the objective (validation) never sees a test example and
every trial of a study sees the same three splits. Inputs are standardised with the training
split's statistics (one mean/std for vectors, one per channel for images).

- `mnist1d` (Greydanus 2020, arXiv 2011.14439): `mnist1d.data.make_dataset` with the package's
  default arguments (4000 train / 1000 test signals of length 40, 10 classes), generated
  offline, never downloaded. Generating costs about a second, so the arrays are cached on disk
  (`RATEBENCH_CACHE_DIR`, default `~/.cache/ratebench`, keyed by the package's version) and in
  memory per process.
- `digits`: scikit-learn's bundled 8×8 handwritten digits (1797 images, 10 classes); a fixed
  20% test split (permutation seed 0), pixels scaled to [0, 1] before standardising.
- `cifar10` / `cifar100`: the python-pickle layout of Krizhevsky's CIFAR archives
  (`data_batch_1..5`, `test_batch`, `batches.meta` with b'data'/b'labels';
  `train`, `test`, `meta` with b'fine_labels'), read from `data.data_dir` or the environment
  variable `RATEBENCH_CIFAR_DIR` (the directory itself or its parent holding
  `cifar-10-batches-py` / `cifar-100-python`). The files are pickles: point this only at files
  you trust.
- `synthetic`: Gaussian inputs of a chosen shape labelled by a random linear teacher
  (argmax of `x·W`, W Gaussian, seed fixed), for throughput measurements.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DATASETS", "Arrays", "DatasetInfo", "cache_dir", "load_arrays"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Arrays:
    """A dataset before splitting: training pool and test set (inputs float32, labels int64)."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset: its description, input shape and class count (from the data options)."""

    name: str
    description: str
    image: bool  # whether inputs are (C, H, W) images; False for vectors
    input_shape: Callable[[dict[str, Any]], tuple[int, ...]]
    n_classes: Callable[[dict[str, Any]], int]
    loader: Callable[[dict[str, Any]], Arrays]


def cache_dir() -> Path:
    """Where generated datasets are cached: `RATEBENCH_CACHE_DIR` or `~/.cache/ratebench`."""
    return Path(os.environ.get("RATEBENCH_CACHE_DIR", Path.home() / ".cache" / "ratebench"))


def _disk_cached(name: str, key: dict[str, Any], make: Callable[[], Arrays]) -> Arrays:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.npz"
    if path.exists():
        with np.load(path) as f:
            return Arrays(f["x_train"], f["y_train"], f["x_test"], f["y_test"])
    arrays = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so concurrent trials never read a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays.__dict__)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training; only the cache is lost
        log.warning("cannot cache %s in %s: %s", name, path.parent, exc)
    return arrays


def _mnist1d(options: dict[str, Any]) -> Arrays:
    def make() -> Arrays:
        from mnist1d.data import get_dataset_args, make_dataset

        data = make_dataset(get_dataset_args())
        return Arrays(
            data["x"].astype(np.float32),
            data["y"].astype(np.int64),
            data["x_test"].astype(np.float32),
            data["y_test"].astype(np.int64),
        )

    # Keyed by the package version (importing mnist1d costs most of a second: matplotlib, scipy),
    # since make_dataset's defaults come with the package.
    return _disk_cached("mnist1d", {"version": importlib.metadata.version("mnist1d")}, make)


def _digits(options: dict[str, Any]) -> Arrays:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return Arrays(x[train], y[train], x[test], y[test])


def _find_cifar_dir(options: dict[str, Any], folder: str, marker: str) -> Path:
    root = options.get("data_dir") or os.environ.get("RATEBENCH_CIFAR_DIR")
    if not root:
        raise FileNotFoundError(
            f"data.data_dir: {folder} needs a local copy; set data.data_dir or "
            "RATEBENCH_CIFAR_DIR to the directory holding it"
        )
    for candidate in (Path(root), Path(root) / folder):
        if (candidate / marker).exists():
            return candidate
    raise FileNotFoundError(f"data.data_dir: no {marker} in {root} or {Path(root) / folder}")


def _unpickle(path: Path) -> dict[bytes, Any]:
    with path.open("rb") as f:
        data: dict[bytes, Any] = pickle.load(f, encoding="bytes")
    return data


def _cifar_images(batch: dict[bytes, Any]) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)


def _cifar10(options: dict[str, Any]) -> Arrays:
    root = _find_cifar_dir(options, "cifar-10-batches-py", "batches.meta")
    batches = [_unpickle(root / f"data_batch_{i}") for i in range(1, 6)]
    test = _unpickle(root / "test_batch")
    x_train = np.concatenate([_cifar_images(b) for b in batches])
    y_train = np.concatenate([np.asarray(b[b"labels"], dtype=np.int64) for b in batches])
    return Arrays(
        x_train.astype(np.float32) / 255.0,
        y_train,
        _cifar_images(test).astype(np.float32) / 255.0,
        np.asarray(test[b"labels"], dtype=np.int64),
    )


def _cifar100(options: dict[str, Any]) -> Arrays:
    root = _find_cifar_dir(options, "cifar-100-python", "meta")
    train, test = _unpickle(root / "train"), _unpickle(root / "test")
    return Arrays(
        _cifar_images(train).astype(np.float32) / 255.0,
        np.asarray(train[b"fine_labels"], dtype=np.int64),
        _cifar_images(test).astype(np.float32) / 255.0,
        np.asarray(test[b"fine_labels"], dtype=np.int64),
    )


SYNTHETIC_SHAPE = (32,)
SYNTHETIC_CLASSES = 10
SYNTHETIC_EXAMPLES = 4096


def _synthetic_shape(options: dict[str, Any]) -> tuple[int, ...]:
    return tuple(options.get("input_shape") or SYNTHETIC_SHAPE)


def _synthetic_classes(options: dict[str, Any]) -> int:
    return int(options.get("n_classes") or SYNTHETIC_CLASSES)


def _synthetic(options: dict[str, Any]) -> Arrays:
    shape, classes = _synthetic_shape(options), _synthetic_classes(options)
    n = int(options.get("n_examples") or SYNTHETIC_EXAMPLES)
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), classes)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ teacher, axis=1).astype(np.int64)
    n_test = n // 5
    return Arrays(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _fixed(value: Any) -> Callable[[dict[str, Any]], Any]:
    return lambda options: value


DATASETS: dict[str, DatasetInfo] = {
    d.name: d
    for d in (
        DatasetInfo(
            "mnist1d",
            "MNIST-1D: 4000 train / 1000 test signals of length 40, 10 classes (generated)",
            False,
            _fixed((40,)),
            _fixed(10),
            _mnist1d,
        ),
        DatasetInfo(
            "digits",
            "scikit-learn digits: 1797 8x8 grey images, 10 classes (bundled)",
            True,
            _fixed((1, 8, 8)),
            _fixed(10),
            _digits,
        ),
        DatasetInfo(
            "cifar10",
            "CIFAR-10: 50000 train / 10000 test 32x32 colour images, 10 classes (local files)",
            True,
            _fixed((3, 32, 32)),
            _fixed(10),
            _cifar10,
        ),
        DatasetInfo(
            "cifar100",
            "CIFAR-100: 50000 train / 10000 test 32x32 colour images, 100 classes (local files)",
            True,
            _fixed((3, 32, 32)),
            _fixed(100),
            _cifar100,
        ),
        DatasetInfo(
            "synthetic",
            "Gaussian inputs of data.input_shape labelled by a random linear teacher",
            False,  # decided by data.input_shape: three dimensions make it an image dataset
            _synthetic_shape,
            _synthetic_classes,
            _synthetic,
        ),
    )
}


def load_arrays(dataset: str, options: dict[str, Any]) -> Arrays:
    """The named dataset's training pool and test set, as numpy arrays."""
    return DATASETS[dataset].loader(options)
