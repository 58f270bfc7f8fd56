"""Datasets (offline, real loaders on files the tests write) and models of the task registry."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from worker.tasks import build_model, count_parameters, describe_tasks, load_task_data, tasks
from worker.tasks.datasets import load_arrays


def test_registry_pairs_convolutional_models_with_image_datasets_only() -> None:
    TASKS = tasks()
    assert "mnist1d-mlp" in TASKS and "mnist1d-resnet" in TASKS
    assert "mnist1d-vgg" not in TASKS and "mnist1d-cnn1d" not in TASKS
    assert TASKS["mnist1d-cnn"].model.name == "cnn1d"  # the one 1-D network, mnist1d only
    assert {"digits-cnn", "cifar10-vgg", "cifar100-resnet", "synthetic-cnn"} <= set(TASKS)
    described = {t["name"]: t for t in describe_tasks()}
    assert described["mnist1d-mlp"]["input_shape"] == [40]
    assert described["cifar100-vgg"]["n_classes"] == 100


def test_mnist1d_is_generated_once_and_cached_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RATEBENCH_CACHE_DIR", str(tmp_path))
    first = load_arrays("mnist1d", {})
    assert first.x_train.shape == (4000, 40) and first.x_test.shape == (1000, 40)
    assert len(list(tmp_path.glob("mnist1d-*.npz"))) == 1
    again = load_arrays("mnist1d", {})
    np.testing.assert_array_equal(first.x_train, again.x_train)
    np.testing.assert_array_equal(first.y_test, again.y_test)


def test_splits_are_fixed_by_seed_disjoint_and_standardised() -> None:
    data = load_task_data("digits-mlp", {"split_seed": 3, "val_fraction": 0.25})
    same = load_task_data("digits-mlp", {"split_seed": 3, "val_fraction": 0.25})
    other = load_task_data("digits-mlp", {"split_seed": 4, "val_fraction": 0.25})
    assert torch.equal(data.x_val, same.x_val)
    assert not torch.equal(data.x_val, other.x_val)
    n_pool = len(data.y_train) + len(data.y_val)
    assert len(data.y_val) == round(0.25 * n_pool)
    train_rows = {tuple(r) for r in data.x_train.tolist()}
    assert not any(tuple(r) in train_rows for r in data.x_val.tolist()[:50])
    assert data.x_train.shape[1] == 64  # flattened for the MLP
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-3


def test_image_models_get_images_and_subsets_are_honoured() -> None:
    data = load_task_data("digits-cnn", {"n_train": 100, "n_val": 50, "n_test": 30})
    assert data.x_train.shape == (100, 1, 8, 8)
    assert (len(data.y_val), len(data.y_test)) == (50, 30)


def test_cifar10_reads_the_python_pickle_layout(
    cifar10_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = cifar10_dir
    arrays = load_arrays("cifar10", {"data_dir": str(tmp_path)})  # the parent directory
    assert arrays.x_train.shape == (20, 3, 32, 32) and arrays.x_test.shape == (6, 3, 32, 32)
    with (folder / "data_batch_2").open("rb") as f:
        batch = pickle.load(f, encoding="bytes")
    expected = batch[b"data"][1].reshape(3, 32, 32).astype(np.float32) / 255
    np.testing.assert_allclose(arrays.x_train[5], expected)
    assert arrays.y_train[5] == batch[b"labels"][1]
    monkeypatch.setenv("RATEBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("RATEBENCH_CIFAR_DIR", str(folder))  # the folder itself works too
    data = load_task_data("cifar10-cnn", {"n_val": 4})
    assert data.x_train.shape == (16, 3, 32, 32) and data.n_classes == 10


def test_cifar100_uses_the_fine_labels(cifar100_dir: Path) -> None:
    folder = cifar100_dir
    arrays = load_arrays("cifar100", {"data_dir": str(folder)})
    with (folder / "test").open("rb") as f:
        test = pickle.load(f, encoding="bytes")
    assert arrays.x_train.shape == (10, 3, 32, 32)
    np.testing.assert_array_equal(arrays.y_test, test[b"fine_labels"])


def test_missing_cifar_directory_says_how_to_set_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RATEBENCH_CIFAR_DIR", raising=False)
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="RATEBENCH_CIFAR_DIR"):
        load_arrays("cifar10", {})
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py/batches\.meta"):
        load_arrays("cifar10", {"data_dir": str(tmp_path)})


def test_synthetic_labels_come_from_a_fixed_linear_teacher() -> None:
    options = {"input_shape": [3, 4, 4], "n_classes": 5, "n_examples": 100}
    a, b = load_arrays("synthetic", options), load_arrays("synthetic", options)
    assert a.x_train.shape == (80, 3, 4, 4) and set(np.unique(a.y_train)) <= set(range(5))
    np.testing.assert_array_equal(a.y_train, b.y_train)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        ("mlp", (40,)),
        ("cnn", (3, 32, 32)),
        ("vgg", (1, 8, 8)),
        ("resnet", (3, 16, 16)),
        ("resnet", (40,)),
    ],
)
def test_models_map_inputs_to_class_logits(model: str, shape: tuple[int, ...]) -> None:
    net = build_model(model, shape, 7, width=8, depth=1 if model != "vgg" else None)
    flat = model == "mlp" or len(shape) == 1
    x = torch.randn(2, *((int(np.prod(shape)),) if flat else shape))
    assert net(x).shape == (2, 7)
    assert count_parameters(model, shape, 7, width=8, depth=None if model == "vgg" else 1) == sum(
        p.numel() for p in net.parameters()
    )


def test_vgg_has_the_vgg13_bn_shape() -> None:
    net = build_model("vgg", (3, 32, 32), 10, width=64)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 512, 512, 512, 512]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 10
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 5
    ins = [3, 64, 64, 128, 128, 256, 256, 512, 512, 512]
    outs = [c.out_channels for c in convs]
    by_hand = sum(9 * i * o + o + 2 * o for i, o in zip(ins, outs, strict=True)) + 512 * 10 + 10
    assert sum(p.numel() for p in net.parameters()) == by_hand


def test_resnet_is_built_from_residual_blocks() -> None:
    from optim import Residual

    net = build_model("resnet", (3, 16, 16), 10, width=4, depth=2)
    assert sum(isinstance(m, Residual) for m in net.modules()) == 6  # 3 stages × depth
    block = next(m for m in net.modules() if isinstance(m, Residual))
    x = torch.randn(2, 4, 16, 16)
    assert torch.allclose(block(x), x + block.branch(x))


def test_transformed_mlp_comes_from_optim() -> None:
    from optim import transformed

    net = build_model("mlp", (40,), 10, width=16, depth=2, transformed=True)
    assert any(isinstance(m, transformed.TransformedTanh) for m in net.modules())
    assert net(torch.randn(3, 40)).shape == (3, 10)
