"""Spec data paths stay under the operator's data roots, CIFAR pickles cannot run code, and
error texts readers see do not echo server paths outside the roots."""

from __future__ import annotations

import os
import pickle
import re
import struct
import subprocess
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from worker.tasks import DataPathError, DataRoots, check_data_source, redact_paths
from worker.tasks.datasets import load_arrays


class _Planted:
    """A pickle payload whose unpickling would call `command` with `argument`."""

    def __init__(self, command: Any, argument: str) -> None:
        self.command, self.argument = command, argument

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return self.command, (self.argument,)


def _payloads(marker: Path) -> list[Any]:
    shell = f"touch {marker}"
    return [
        _Planted(os.system, shell),
        _Planted(exec, f"open({str(marker)!r}, 'w').close()"),
        _Planted(subprocess.getoutput, shell),
    ]


def _plant(cifar10_dir: Path, payload: Any) -> None:
    """Replace one data batch with a dict whose labels would run the payload."""
    with (cifar10_dir / "data_batch_3").open("wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": payload}, f)


@pytest.mark.parametrize("index", range(3), ids=["os.system", "builtins.exec", "subprocess"])
def test_a_planted_pickle_is_refused_and_runs_nothing(
    cifar10_dir: Path, tmp_path: Path, index: int
) -> None:
    marker = tmp_path / "marker"
    payload = _payloads(marker)[index]
    _plant(cifar10_dir, payload)
    name = f"{payload.command.__module__}.{payload.command.__name__}".replace("posix", "os")
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle") as refused:
        load_arrays("cifar10", {"data_dir": str(cifar10_dir)})
    message = str(refused.value)
    assert "data_batch_3" in message and "only numpy arrays and lists" in message
    assert name.split(".")[-1] in message
    assert not marker.exists()


def test_an_object_array_is_refused(cifar10_dir: Path, tmp_path: Path) -> None:
    """Object arrays would unpickle arbitrary items; CIFAR arrays are uint8."""
    marker = tmp_path / "marker"
    items = np.array([_Planted(os.system, f"touch {marker}")], dtype=object)
    _plant(cifar10_dir, items)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing a numpy object dtype"):
        load_arrays("cifar10", {"data_dir": str(cifar10_dir)})
    assert not marker.exists()


class _Python2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's cPickle wrote `str` (BINSTRING), so protocol 2 needs no
    `_codecs.encode`: the layout of the original CIFAR archives."""

    dispatch: ClassVar[dict[type, Any]] = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def _python2_pickle(path: Path, data: dict[bytes, Any]) -> None:
    with path.open("wb") as f:
        _Python2Pickler(f, protocol=2).dump(data)
    raw = path.read_bytes().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path.write_bytes(raw)


@pytest.mark.parametrize("layout", ["python2", "protocol5"])
def test_cifar_files_of_every_layout_still_load(
    cifar10_dir: Path, tmp_path: Path, layout: str
) -> None:
    rng = np.random.default_rng(7)
    batch = {
        b"batch_label": b"training batch 3 of 5",
        b"labels": [int(v) for v in rng.integers(0, 10, 4)],
        b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
        b"filenames": [b"a.png", b"b.png", b"c.png", b"d.png"],
    }
    path = cifar10_dir / "data_batch_3"
    if layout == "python2":
        _python2_pickle(path, batch)
        assert b"numpy.core.multiarray\n_reconstruct" in path.read_bytes()
        assert b"_codecs" not in path.read_bytes()
    else:
        path.write_bytes(pickle.dumps(batch, protocol=5))
    arrays = load_arrays("cifar10", {"data_dir": str(tmp_path)})
    expected = batch[b"data"][1].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(arrays.x_train[9], expected)
    assert arrays.y_train[8:12].tolist() == batch[b"labels"]


def test_paths_outside_the_roots_are_refused_alike_whether_they_exist_or_not(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "inside").mkdir(parents=True)
    (outside / "cifar-10-batches-py").mkdir(parents=True)
    (root / "link").symlink_to(outside)
    roots = DataRoots.configure(str(root), "unused")
    assert roots.resolve("inside") == (root / "inside").resolve()  # relative: from the root
    assert roots.resolve(str(root / "inside" / "..")) == root.resolve()
    messages = set()
    for value in (
        str(outside),
        str(tmp_path / "nothing-here"),
        "../outside",
        str(root / ".." / "outside"),
        "link",  # inside the root, but a symlink out of it
        "/etc",
    ):
        with pytest.raises(DataPathError) as refused:
            roots.resolve(value)
        messages.add(str(refused.value))
    assert len(messages) == 1, messages  # nothing tells whether the path exists
    assert str(root.resolve()) in messages.pop()
    with pytest.raises(DataPathError, match="NUL"):
        roots.resolve("inside\x00/x")


def test_the_roots_come_from_the_environment_and_default_to_the_data_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", f"{a}{os.pathsep}{os.pathsep}{b}")
    assert DataRoots.from_env().folders == (a, b)
    monkeypatch.delenv("RATEBENCH_DATA_ROOTS")
    monkeypatch.setenv("RATEBENCH_DATA_DIR", str(a))
    monkeypatch.setenv("RATEBENCH_CIFAR_DIR", str(b))
    assert DataRoots.from_env() == DataRoots((a, b), b)


def test_the_worker_refuses_a_path_outside_its_roots_before_reading(
    cifar10_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: whatever the service checked, the loader checks its own roots."""
    marker = tmp_path / "marker"
    _plant(cifar10_dir, _Planted(os.system, f"touch {marker}"))
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(tmp_path / "elsewhere"))
    with pytest.raises(DataPathError, match=r"^data\.data_dir: must name a folder under"):
        load_arrays("cifar10", {"data_dir": str(cifar10_dir)})
    assert not marker.exists()


def test_submit_time_check_names_missing_files_under_the_roots(cifar10_dir: Path) -> None:
    roots = DataRoots.configure(str(cifar10_dir.parent), "unused")
    assert check_data_source("cifar10-cnn", str(cifar10_dir.parent), roots) is None
    assert check_data_source("cifar10-cnn", "cifar-10-batches-py", roots) is None
    assert check_data_source("mnist1d-mlp", None, roots) is None
    (cifar10_dir / "data_batch_4").unlink()
    problem = check_data_source("cifar10-cnn", None, DataRoots(roots.folders, cifar10_dir))
    assert problem is not None and problem.endswith("lacks data_batch_4 of cifar10")
    problem = check_data_source("cifar100-vgg", "", roots)
    assert problem == f"no cifar100 (cifar-100-python/meta) in {cifar10_dir.parent.resolve()}"
    problem = check_data_source("cifar100-vgg", None, roots)
    assert problem is not None and "needs a local copy" in problem


def test_error_texts_keep_paths_under_the_roots_only(tmp_path: Path) -> None:
    root = tmp_path / "data"
    text = (
        f"FileNotFoundError: [Errno 2] No such file or directory: '/srv/secret/x.npz'; "
        f"no cifar10 in {root}/cifar and {root}/../etc/passwd, "
        'File "/usr/lib/python3/site.py", line 3; see http://127.0.0.1:8000/api/v1 or a/b'
    )
    redacted = redact_paths(text, [root])
    assert redacted == (
        "FileNotFoundError: [Errno 2] No such file or directory: '<path>'; "
        f"no cifar10 in {root}/cifar and <path>, "
        'File "<path>", line 3; see http://127.0.0.1:8000/api/v1 or a/b'
    )


@pytest.mark.ray
def test_a_failed_trial_records_no_server_path_outside_the_roots(
    ray_runtime: None, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker refuses a path outside its roots and its message names those roots; the
    driver, whose roots are elsewhere, stores the error with every such path redacted."""
    from worker.results import load_trials
    from worker.spec import StudySpec
    from worker.sweep import run_study

    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(tmp_path))  # the driver's; Ray's started
    spec = StudySpec.model_validate(
        {
            "name": "paths",
            "task": "cifar10-mlp",
            "data": {"data_dir": "/srv/not-a-root/cifar"},
            "model": {"width": 4, "depth": 1},
            "arms": [{"optimizer": "sgd"}],
            "budget": {"trials_per_arm": 1, "epochs": 1, "final_seeds": 1},
            "resources": {"max_retries": 0},
        }
    )
    run_study(spec, sqlite_url, "paths")
    (trial,) = load_trials(sqlite_url, "paths", spec)
    error = trial.user_attrs["error"]
    assert "data.data_dir: must name a folder under the data roots (<path>" in error, error
    assert re.search(r"(?<![\w.:/])/\w", error) is None, error
