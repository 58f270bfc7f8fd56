"""Datasets from files, without code: arrays that numpy wrote, read without pickles.

`data.data_dir` names a folder under the data roots (`worker.tasks._paths`) that holds either

- `data.npz`, as `np.savez(path, x_train=…, y_train=…, x_test=…, y_test=…)` writes it (or
  `np.savez_compressed`), with optionally `x_val` and `y_val`; or
- the same arrays as `.npy` files, as `np.save` writes them: `x_train.npy`, `y_train.npy`,
  `x_test.npy`, `y_test.npy`, optionally `x_val.npy`, `y_val.npy` (the second layout).

Two datasets read them: `files` (classification: integer labels 0 … C−1, C from `data.n_classes`
or the largest label plus one) and `files-regression` (regression: float targets, one value or
one row per example). Inputs are `(N, features)` or `(N, C, H, W)` images, any integer or float
type (read as float32); when the file brings `x_val`/`y_val` they are the validation split,
otherwise it is cut from the training pool (`worker.tasks.data`).

Every array is read with `allow_pickle=False`, and its header is checked before its data: an
object array (which only a pickle can hold), a structured or complex type, a file that is not
numpy's format (a pickle renamed `.npz` among them) is refused, as is a file that is a link to
a place outside the data roots (resolved, like `data_dir` itself), a missing or unknown array
name, splits whose inputs and targets differ in length or whose inputs differ in shape, more
than `MAX_FILE_VALUES` values, NaN or infinite values, labels outside 0 … C−1, and regression
targets that do not vary (there is nothing to learn).
Each refusal is a `DataFileError` naming the file and the array. The service checks a submitted
spec's files (the arrays' headers and labels when the spec is validated, every value when it is
stored: `check`), and the worker checks again when it reads them.
"""

from __future__ import annotations

import functools
import math
import os
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from worker.spec_base import MAX_FILE_VALUES
from worker.tasks._paths import DataPathError, DataRoots
from worker.tasks.contract import Dataset, DataShape, Kind, Splits

__all__ = ["FILE_DATASETS", "DataFileError", "inspect_folder", "read_folder"]

NPZ_NAME = "data.npz"
REQUIRED = ("x_train", "y_train", "x_test", "y_test")
OPTIONAL = ("x_val", "y_val")
MAX_CLASSES = 1000  # as data.n_classes allows


class DataFileError(ValueError):
    """A data file that cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class _Source:
    """Where a folder's arrays are: one `.npz` or several `.npy` files (real paths)."""

    folder: Path
    npz: Path | None
    npy: tuple[tuple[str, Path], ...]  # (array name, file), for the second layout

    def file(self, name: str) -> Path:
        return dict(self.npy)[name]

    def describe(self, name: str) -> str:
        return f"{self.npz}: {name}" if self.npz is not None else str(self.file(name))

    def identity(self) -> tuple[Any, ...]:
        """The files' paths, sizes and modification times: a changed file is read again."""
        files = [self.npz] if self.npz is not None else [path for _, path in self.npy]
        return tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f)


def _inside(path: Path, roots: DataRoots, shown: Path) -> Path:
    real = Path(os.path.realpath(path))
    if not roots.contains(real):
        raise DataFileError(f"{shown} is a link to a file outside the data roots")
    return real


def _locate(data_dir: str | None, roots: DataRoots) -> _Source:
    if data_dir is None:
        raise DataFileError(
            f"give the folder holding {NPZ_NAME} (or x_train.npy, …) under the data roots "
            f"({roots.describe()})"
        )
    folder = roots.resolve(data_dir)
    npz = folder / NPZ_NAME
    if npz.exists() or npz.is_symlink():
        return _Source(folder, _inside(npz, roots, npz), ())
    found = tuple(
        (name, _inside(folder / f"{name}.npy", roots, folder / f"{name}.npy"))
        for name in (*REQUIRED, *OPTIONAL)
        if (folder / f"{name}.npy").exists() or (folder / f"{name}.npy").is_symlink()
    )
    if not found:
        raise FileNotFoundError(f"no {NPZ_NAME} and no x_train.npy in {folder}")
    return _Source(folder, None, found)


def _read_header(f: IO[bytes], where: str) -> _Header:
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except ValueError as exc:
        raise DataFileError(f"{where} is not an array in numpy's .npy format ({exc})") from None
    if dtype.hasobject:
        raise DataFileError(f"{where}: object arrays are refused (only a pickle can hold one)")
    if dtype.fields is not None or dtype.kind not in "biuf":
        raise DataFileError(f"{where}: holds {dtype}; use integer or float numbers")
    return _Header(tuple(int(n) for n in shape), dtype)


def _headers(source: _Source) -> dict[str, _Header]:
    if source.npz is None:
        headers = {}
        for name, path in source.npy:
            with path.open("rb") as f:
                headers[name] = _read_header(f, str(path))
        return headers
    try:
        archive = zipfile.ZipFile(source.npz)
    except (zipfile.BadZipFile, OSError):
        raise DataFileError(
            f"{source.npz} is not a .npz archive (np.savez's format); it is never unpickled"
        ) from None
    with archive:
        headers = {}
        for member in archive.namelist():
            name = member.removesuffix(".npy")
            if name not in (*REQUIRED, *OPTIONAL):
                raise DataFileError(
                    f"{source.npz}: unknown array {name!r}; expected {', '.join(REQUIRED)} "
                    f"and optionally {', '.join(OPTIONAL)}"
                )
            with archive.open(member) as f:
                headers[name] = _read_header(f, f"{source.npz}: {name}")
    return headers


def _check_layout(source: _Source, headers: Mapping[str, _Header], kind: Kind) -> None:
    where = source.npz or source.folder
    missing = [name for name in REQUIRED if name not in headers]
    if missing:
        raise DataFileError(f"{where}: no {', '.join(missing)}; expected {', '.join(REQUIRED)}")
    if ("x_val" in headers) != ("y_val" in headers):
        raise DataFileError(f"{where}: give both x_val and y_val, or neither")
    total = sum(math.prod(h.shape) for h in headers.values())
    if total > MAX_FILE_VALUES:
        raise DataFileError(f"{where}: {total:,} values; at most {MAX_FILE_VALUES:,}")
    x_train = headers["x_train"]
    if len(x_train.shape) not in (2, 4):
        raise DataFileError(
            f"{source.describe('x_train')}: shape {x_train.shape}; inputs are (examples, "
            "features) or (examples, channels, height, width)"
        )
    for split in ("train", "val", "test"):
        if f"x_{split}" not in headers:
            continue
        x, y = headers[f"x_{split}"], headers[f"y_{split}"]
        if x.shape[1:] != x_train.shape[1:]:
            raise DataFileError(
                f"{source.describe(f'x_{split}')}: examples of shape {x.shape[1:]}, but "
                f"x_train's are {x_train.shape[1:]}"
            )
        if x.shape[0] != y.shape[0] or x.shape[0] < 1:
            raise DataFileError(
                f"{where}: x_{split} has {x.shape[0]} examples and y_{split} {y.shape[0]}; "
                "each input needs one target"
            )
        _check_targets_header(source, split, y, headers["y_train"], kind)


def _check_targets_header(
    source: _Source, split: str, y: _Header, y_train: _Header, kind: Kind
) -> None:
    where = source.describe(f"y_{split}")
    if kind == "classification":
        if len(y.shape) != 1 or y.dtype.kind not in "iu":
            raise DataFileError(
                f"{where}: labels are one integer per example; got {y.dtype} of shape {y.shape}"
            )
    elif len(y.shape) not in (1, 2) or y.shape[1:] != y_train.shape[1:]:
        raise DataFileError(
            f"{where}: targets are one value or one row per example, as in y_train; "
            f"got shape {y.shape}"
        )


def _load(source: _Source, name: str) -> np.ndarray:
    try:
        if source.npz is not None:
            with np.load(source.npz, allow_pickle=False) as archive:
                return np.asarray(archive[name])
        return np.asarray(np.load(source.file(name), allow_pickle=False))
    except (ValueError, OSError, zipfile.BadZipFile) as exc:
        raise DataFileError(f"{source.describe(name)}: cannot be read: {exc}") from None


def _classes(source: _Source, labels: Mapping[str, np.ndarray], given: int | None) -> int:
    low = min(int(v.min()) for v in labels.values())
    high = max(int(v.max()) for v in labels.values())
    limit = given if given is not None else MAX_CLASSES
    for name, values in labels.items():
        bad = (values < 0) | (values >= limit)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataFileError(
                f"{source.describe(name)}: label {int(values[row])} at row {row} is out of range; "
                f"labels are 0 to {limit - 1}"
                + ("" if given is not None else " (at most 1000 classes)")
            )
    n = given if given is not None else high + 1
    if n < 2 or (given is None and low == high):
        raise DataFileError(f"{source.describe('y_train')}: a classification needs two classes")
    return n


def _finite(source: _Source, name: str, values: np.ndarray) -> None:
    if values.dtype.kind == "f":
        bad = ~np.isfinite(values)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise DataFileError(
                f"{source.describe(name)}: NaN or infinite value at row {row}; "
                "every value must be a finite number"
            )


@dataclass(frozen=True, eq=False)  # hashed by identity: `_inspect` caches one per file version
class _Inspected:
    source: _Source
    headers: dict[str, _Header]
    shape: DataShape


def inspect_folder(kind: Kind, options: Mapping[str, Any], roots: DataRoots) -> _Inspected:
    """The arrays' headers checked, and for classification the labels read and checked; the
    data's shape. Raises DataPathError, FileNotFoundError or DataFileError."""
    source = _locate(options.get("data_dir"), roots)
    return _inspect(kind, options.get("n_classes"), source, source.identity())


@functools.lru_cache(maxsize=32)
def _inspect(kind: Kind, given: int | None, source: _Source, _identity: Any) -> _Inspected:
    headers = _headers(source)
    _check_layout(source, headers, kind)
    splits = [s for s in ("train", "val", "test") if f"y_{s}" in headers]
    y_train = headers["y_train"]
    if kind == "classification":
        labels = {f"y_{s}": _load(source, f"y_{s}") for s in splits}
        n_outputs = _classes(source, labels, given)
    else:
        n_outputs = y_train.shape[1] if len(y_train.shape) == 2 else 1
    own = "x_val" in headers
    shape = DataShape(headers["x_train"].shape[1:], n_outputs, y_train.shape[0], own)
    return _Inspected(source, headers, shape)


def read_folder(kind: Kind, options: Mapping[str, Any], roots: DataRoots) -> Splits:
    """Every array, checked: the headers and labels (`inspect_folder`), then finite values
    and, for regression, targets that vary."""
    inspected = inspect_folder(kind, options, roots)
    return _read(kind, inspected, options.get("n_classes"))


def _read(kind: Kind, inspected: _Inspected, given: int | None) -> Splits:
    source = inspected.source
    arrays = {n: _load(source, n) for n in (*REQUIRED, *OPTIONAL) if n in inspected.headers}
    for name, values in arrays.items():
        _finite(source, name, values)
    if kind == "classification":
        _classes(source, {n: v for n, v in arrays.items() if n.startswith("y_")}, given)
    else:
        variance = np.asarray(arrays["y_train"], dtype=np.float64).var(axis=0).mean()
        if not variance > 0:
            raise DataFileError(
                f"{source.describe('y_train')}: the targets do not vary; a regression needs "
                "targets that do"
            )
    target = np.int64 if kind == "classification" else np.float32
    return Splits(
        **{n: v.astype(np.float32 if n.startswith("x_") else target) for n, v in arrays.items()}
    )


@functools.lru_cache(maxsize=64)
def _verified(kind: Kind, inspected: _Inspected, given: int | None, _identity: Any) -> None:
    """`_read` for its checks alone, once per file version (the arrays are not kept)."""
    _read(kind, inspected, given)


def _check(kind: Kind) -> Any:
    def check(options: Mapping[str, Any], roots: DataRoots) -> str | None:
        try:
            inspected = inspect_folder(kind, options, roots)
            identity = inspected.source.identity()
            _verified(kind, inspected, options.get("n_classes"), identity)
        except (DataPathError, FileNotFoundError, DataFileError) as exc:
            return str(exc)
        return None

    return check


def _shape(kind: Kind) -> Any:
    return lambda options: inspect_folder(kind, options, DataRoots.current()).shape


def _load_checked(kind: Kind) -> Any:
    def load(options: Mapping[str, Any]) -> Splits:
        try:
            return read_folder(kind, options, DataRoots.from_env())
        except (DataPathError, FileNotFoundError, DataFileError) as exc:
            raise type(exc)(f"data.data_dir: {exc}") from None

    return load


def _key(options: Mapping[str, Any]) -> Any:
    source = _locate(options.get("data_dir"), DataRoots.from_env())
    return [source.identity(), options.get("n_classes")]


FILE_DATASETS: dict[str, Dataset] = {
    "files": Dataset(
        "files",
        "your arrays: data.npz (or .npy files) in data.data_dir, integer labels",
        "classification",
        _load_checked("classification"),
        _shape("classification"),
        options=frozenset({"data_dir", "n_classes"}),
        check=_check("classification"),
        cache_key=_key,
    ),
    "files-regression": Dataset(
        "files-regression",
        "your arrays: data.npz (or .npy files) in data.data_dir, float targets",
        "regression",
        _load_checked("regression"),
        _shape("regression"),
        options=frozenset({"data_dir"}),
        check=_check("regression"),
        cache_key=_key,
    ),
}
