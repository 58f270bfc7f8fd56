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
  `train`, `test`, `meta` with b'fine_labels'), read from `data.data_dir` (a folder under the
  data roots, `worker.tasks._paths`) or else the operator's `RATEBENCH_CIFAR_DIR`: the folder
  itself or its parent holding `cifar-10-batches-py` / `cifar-100-python`. The files are
  pickles, written by Python 2's cPickle; they are read with `_CifarUnpickler`, which builds
  numpy arrays, lists, dicts, strings and numbers and refuses every other global, so a planted
  file cannot run code.
- `synthetic`: Gaussian inputs of a chosen shape labelled by a random linear teacher
  (argmax of `x·W`, W Gaussian, seed fixed), for throughput measurements.

Each is a `worker.tasks.contract.Dataset` (all classification): its loader, its shape (what the
spec checks need: input shape, classes, the training pool's size), the data options it takes,
and for CIFAR the check of its folder at submission.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import json
import logging
import math
import os
import pickle
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from worker.tasks._paths import DataPathError, DataRoots
from worker.tasks.contract import Dataset, DataShape, Splits

__all__ = [
    "DATASETS",
    "SYNTHETIC_EXAMPLES",
    "Arrays",
    "cache_dir",
    "cifar_folder",
    "load_arrays",
    "locate_cifar",
]

log = logging.getLogger(__name__)


# A built-in dataset before splitting: training pool and test set (inputs float32, labels int64).
Arrays = Splits


def cache_dir() -> Path:
    """Where generated datasets are cached: `RATEBENCH_CACHE_DIR` or `~/.cache/ratebench`."""
    return Path(os.environ.get("RATEBENCH_CACHE_DIR", Path.home() / ".cache" / "ratebench"))


def _disk_cached(name: str, key: dict[str, Any], make: Callable[[], Arrays]) -> Arrays:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / f"{name}-{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as f:
            return Arrays(f["x_train"], f["y_train"], f["x_test"], f["y_test"])
    arrays = make()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write to a temporary file and rename, so concurrent trials never read a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            parts = ("x_train", "y_train", "x_test", "y_test")
            np.savez(f, **{k: getattr(arrays, k) for k in parts})
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop training; only the cache is lost
        log.warning("cannot cache %s in %s: %s", name, path.parent, exc)
    return arrays


def _mnist1d(options: Mapping[str, Any]) -> Arrays:
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


def _digits(options: Mapping[str, Any]) -> Arrays:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = data.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(y))
    n_test = len(y) // 5
    test, train = order[:n_test], order[n_test:]
    return Arrays(x[train], y[train], x[test], y[test])


@dataclass(frozen=True)
class _CifarLayout:
    folder: str  # the archive's folder name
    files: tuple[str, ...]  # the first one marks the folder


_CIFAR = {
    "cifar10": _CifarLayout(
        "cifar-10-batches-py",
        ("batches.meta", *(f"data_batch_{i}" for i in range(1, 6)), "test_batch"),
    ),
    "cifar100": _CifarLayout("cifar-100-python", ("meta", "train", "test")),
}


def locate_cifar(dataset: str, data_dir: str | None, roots: DataRoots) -> Path:
    """The folder holding `dataset`'s files: `data_dir` (checked against `roots`) or the
    operator's CIFAR folder, itself or its archive subfolder. Raises DataPathError for a path
    outside the roots and FileNotFoundError (naming the folder, inside the roots) for missing
    files; messages leave the field (`data.data_dir`) to the caller."""
    layout = _CIFAR[dataset]
    if data_dir is not None:
        base = roots.resolve(data_dir)
    elif roots.cifar_dir is not None:
        base = roots.cifar_dir
    else:
        raise FileNotFoundError(
            f"{dataset} needs a local copy of {layout.folder}: set data.data_dir to a folder "
            f"under the data roots ({roots.describe()}), or the operator sets RATEBENCH_CIFAR_DIR"
        )
    marker = layout.files[0]
    for candidate in (base, base / layout.folder):
        if (candidate / marker).is_file():
            missing = [f for f in layout.files if not (candidate / f).is_file()]
            if missing:
                raise FileNotFoundError(f"{candidate} lacks {', '.join(missing)} of {dataset}")
            return candidate
    raise FileNotFoundError(f"no {dataset} ({layout.folder}/{marker}) in {base}")


def cifar_folder(dataset: str, options: Mapping[str, Any]) -> Path:
    """`locate_cifar` with the roots of this process's environment: the worker checks again,
    just before reading, whatever the service checked."""
    try:
        return locate_cifar(dataset, options.get("data_dir"), DataRoots.from_env())
    except (DataPathError, FileNotFoundError) as exc:
        raise type(exc)(f"data.data_dir: {exc}") from None


def _checked_dtype(*args: Any) -> np.dtype[Any]:
    dtype = np.dtype(*args)
    if dtype.hasobject:  # an object array would unpickle arbitrary objects as its items
        raise pickle.UnpicklingError(f"refusing a numpy object dtype ({dtype})")
    return dtype


def _numpy_globals() -> dict[tuple[str, str], Any]:
    # numpy 2's pickles name numpy._core; numpy 1's (and Python 2's, CIFAR's) name numpy.core.
    try:
        core = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:  # numpy 1
        core = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    found: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray}
    found[("numpy", "dtype")] = _checked_dtype
    for package in ("numpy.core", "numpy._core"):
        found[(f"{package}.multiarray", "_reconstruct")] = core._reconstruct
        found[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer
    return found


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR files hold (dicts, lists, bytes, numbers, numpy arrays of plain
    dtypes: the globals `numpy.core.multiarray._reconstruct`, `numpy.ndarray` and `numpy.dtype`
    in the original Python 2 files, `numpy.core.numeric._frombuffer` in protocol-5 re-pickles)
    and refuses any other global, before anything is called."""

    allowed = _numpy_globals()

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        found = self.allowed.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(
                f"refusing to unpickle {module}.{name} from {self.path}: CIFAR files contain "
                "only numpy arrays and lists"
            )
        return found


def _unpickle(path: Path) -> dict[bytes, Any]:
    with path.open("rb") as f:
        data = _CifarUnpickler(f, path).load()
    if not isinstance(data, dict):
        raise pickle.UnpicklingError(f"{path}: a CIFAR file holds a dict, not {type(data)}")
    return data


def _cifar_images(batch: dict[bytes, Any]) -> np.ndarray:
    return np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)


def _cifar10(options: Mapping[str, Any]) -> Arrays:
    root = cifar_folder("cifar10", options)
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


def _cifar100(options: Mapping[str, Any]) -> Arrays:
    root = cifar_folder("cifar100", options)
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


def _synthetic_shape(options: Mapping[str, Any]) -> tuple[int, ...]:
    return tuple(options.get("input_shape") or SYNTHETIC_SHAPE)


def _synthetic_classes(options: Mapping[str, Any]) -> int:
    return int(options.get("n_classes") or SYNTHETIC_CLASSES)


def _synthetic(options: Mapping[str, Any]) -> Arrays:
    shape, classes = _synthetic_shape(options), _synthetic_classes(options)
    n = int(options.get("n_examples") or SYNTHETIC_EXAMPLES)
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((n, *shape), dtype=np.float32)
    teacher = rng.standard_normal((int(np.prod(shape)), classes)).astype(np.float32)
    y = np.argmax(x.reshape(n, -1) @ teacher, axis=1).astype(np.int64)
    n_test = n // 5
    return Arrays(x[n_test:], y[n_test:], x[:n_test], y[:n_test])


def _synthetic_data_shape(options: Mapping[str, Any]) -> DataShape:
    n = int(options.get("n_examples") or SYNTHETIC_EXAMPLES)
    return DataShape(_synthetic_shape(options), _synthetic_classes(options), n - n // 5)


def _synthetic_limits(options: Mapping[str, Any]) -> list[tuple[str, str]]:
    from worker.spec_base import MAX_SYNTHETIC_VALUES

    size = int(options.get("n_examples") or SYNTHETIC_EXAMPLES) * math.prod(
        _synthetic_shape(options)
    )
    if size > MAX_SYNTHETIC_VALUES:
        return [("n_examples", f"{size:,} input values; at most {MAX_SYNTHETIC_VALUES:,}")]
    return []


def _cifar_source(dataset: str) -> Callable[[Mapping[str, Any], DataRoots], str | None]:
    def check(options: Mapping[str, Any], roots: DataRoots) -> str | None:
        try:
            locate_cifar(dataset, options.get("data_dir"), roots)
        except (DataPathError, FileNotFoundError) as exc:
            return str(exc)
        return None

    return check


def _cifar_key(dataset: str) -> Callable[[Mapping[str, Any]], Any]:
    # the folder the loader will read (checked on every call), so a new copy is a new entry
    return lambda options: str(cifar_folder(dataset, options))


_DIGITS_POOL = 1797 - 1797 // 5

DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "mnist1d",
            "MNIST-1D: 4000 train / 1000 test signals of length 40, 10 classes (generated)",
            "classification",
            _mnist1d,
            DataShape((40,), 10, 4000),
        ),
        Dataset(
            "digits",
            "scikit-learn digits: 1797 8x8 grey images, 10 classes (bundled)",
            "classification",
            _digits,
            DataShape((1, 8, 8), 10, _DIGITS_POOL),
        ),
        Dataset(
            "cifar10",
            "CIFAR-10: 50000 train / 10000 test 32x32 colour images, 10 classes (local files)",
            "classification",
            _cifar10,
            DataShape((3, 32, 32), 10, 50_000),
            options=frozenset({"data_dir"}),
            check=_cifar_source("cifar10"),
            cache_key=_cifar_key("cifar10"),
        ),
        Dataset(
            "cifar100",
            "CIFAR-100: 50000 train / 10000 test 32x32 colour images, 100 classes (local files)",
            "classification",
            _cifar100,
            DataShape((3, 32, 32), 100, 50_000),
            options=frozenset({"data_dir"}),
            check=_cifar_source("cifar100"),
            cache_key=_cifar_key("cifar100"),
        ),
        Dataset(
            "synthetic",
            "Gaussian inputs of data.input_shape labelled by a random linear teacher",
            "classification",
            _synthetic,
            _synthetic_data_shape,
            options=frozenset({"input_shape", "n_classes", "n_examples"}),
            limits=_synthetic_limits,
        ),
    )
}


def load_arrays(dataset: str, options: Mapping[str, Any]) -> Arrays:
    """The named built-in dataset's training pool and test set, as numpy arrays."""
    return DATASETS[dataset].load(options)
