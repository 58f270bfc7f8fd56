"""Models: MLP (plain or transformed), a small CNN, VGG13 with BatchNorm, a ResNet.

Every model maps a batch of inputs to class logits. MLPs and vector ResNets take flattened
inputs (the runner flattens the data once, on the device, instead of every step); the
convolutional models take (N, C, H, W) images.

- `mlp`: `depth` hidden layers of `width` units (ReLU or tanh). `transformed: true` builds
  `optim.transformed.transformed_mlp` instead (Raiko, Valpola, LeCun 2012; Vatanen et al. 2013,
  arXiv 1301.3476): tanh units shifted to zero mean output and zero mean slope, with linear
  shortcuts; the runner calls `optim.transformed.update_transformations` every
  `transform_every` steps.
- `cnn`: `depth` blocks of 3×3 convolution + ReLU + 2×2 max-pooling (pooling stops once the
  image is 1×1), channels `width·2^i` (growth capped at 8×), global average pooling, a linear
  classifier.
- `vgg`: the VGG13-BN shape used for CIFAR in the back-matching paper (Zhang, Chen, Liu 2018,
  arXiv 1802.09750): ten 3×3 conv + BatchNorm + ReLU layers in five stages of channels
  (w, w), (2w, 2w), (4w, 4w), (8w, 8w), (8w, 8w), each stage followed by 2×2 max-pooling while
  the image is larger than 1×1; then global average pooling (the identity on 32×32 inputs,
  where the image is 1×1 by then) and one linear layer, as in the usual CIFAR variant.
  `width` = 64 is the original; smaller widths scale it down. Its depth is fixed by the shape.
- `resnet`: residual blocks `x + F(x)` built with `optim.Residual` (so `bmp` can see the
  shortcut), a ReLU after each. Images: a 3×3 stem, three stages of `depth` blocks with
  F = conv-BN-ReLU-conv-BN at widths (w, 2w, 4w) and a stride-2 conv-BN-ReLU between stages
  (a channel-changing shortcut is not `x + F(x)`, so the change happens outside the blocks).
  Vectors: a linear stem, `depth` blocks with F = Linear-ReLU-Linear, a linear classifier.
- `cnn1d` (the `mnist1d-cnn` task): a VGG-style 1-D network for signals given as vectors
  (mnist1d's length-40 signals, one channel): `depth` stages of two 3-tap Conv1d + BatchNorm1d +
  ReLU layers at channels `width·2^i` (growth capped at 8×), each stage followed by 2×
  max-pooling while the signal is longer than 1, then a linear classifier on the flattened
  features (position matters in mnist1d's templates, so no global pooling). It is the
  normalised-convolution class of the back-matching paper at CPU scale; the mnist1d paper
  (Greydanus 2020, arXiv 2011.14439) reports CNN test accuracy in the low-to-mid 90s.
  Not paired with other datasets: it exists for `mnist1d-cnn` (`worker.tasks`).

Each is a `worker.tasks.contract.Model` with its typed options (`width`, `depth`; the MLP also
`activation`, `transformed`, `transform_every`), their defaults and bounds (the spec's limits,
`worker.spec_base`); `vgg` has no depth (the VGG13 shape fixes it). `build_model` builds one
by name for benchmarks and tests.
"""

from __future__ import annotations

import importlib
import math
from typing import Any

import torch
from torch import nn

from worker.spec_base import MAX_DEPTH, MAX_WIDTH
from worker.tasks.contract import Model, Option

__all__ = ["CNN1D", "MODELS", "build_model", "count_parameters"]


def _activation(name: str) -> nn.Module:
    return nn.Tanh() if name == "tanh" else nn.ReLU()


def _mlp(
    input_shape: tuple[int, ...],
    n_classes: int,
    width: int,
    depth: int,
    activation: str = "relu",
    transformed: bool = False,
    **_: Any,
) -> nn.Module:
    n_in = math.prod(input_shape)
    if transformed:
        from optim.transformed import transformed_mlp

        model: nn.Module = transformed_mlp(n_in, [width] * depth, n_classes)
        return model
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(n_in if i == 0 else width, width), _activation(activation)]
    layers.append(nn.Linear(width if depth else n_in, n_classes))
    return nn.Sequential(*layers)


def _cnn(
    input_shape: tuple[int, ...], n_classes: int, width: int, depth: int, **_: Any
) -> nn.Module:
    channels, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for i in range(depth):
        out = width * 2 ** min(i, 3)
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.ReLU()]
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        channels = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


_VGG13_STAGES = ((1, 1), (2, 2), (4, 4), (8, 8), (8, 8))


def _vgg(input_shape: tuple[int, ...], n_classes: int, width: int, **_: Any) -> nn.Module:
    channels, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for stage in _VGG13_STAGES:
        for multiple in stage:
            out = width * multiple
            layers += [nn.Conv2d(channels, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU()]
            channels = out
        if size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


def _cnn1d(
    input_shape: tuple[int, ...], n_classes: int, width: int, depth: int, **_: Any
) -> nn.Module:
    length = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Unflatten(1, (1, length))]
    channels = 1
    for stage in range(depth):
        out = width * 2 ** min(stage, 3)
        for _i in range(2):
            layers += [nn.Conv1d(channels, out, 3, padding=1), nn.BatchNorm1d(out), nn.ReLU()]
            channels = out
        if length >= 2:
            layers.append(nn.MaxPool1d(2))
            length //= 2
    layers += [nn.Flatten(), nn.Linear(channels * length, n_classes)]
    return nn.Sequential(*layers)


def _residual(branch: nn.Module) -> nn.Module:
    import optim

    # `optim.Residual`, or its module while the package does not export it yet.
    residual = (
        getattr(optim, "Residual", None) or importlib.import_module("optim.residual").Residual
    )
    block: nn.Module = residual(branch)
    return block


def _conv_bn(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.BatchNorm2d(c_out)]


def _resnet(
    input_shape: tuple[int, ...], n_classes: int, width: int | None, depth: int, **_: Any
) -> nn.Module:
    layers: list[nn.Module]
    if width is None:
        width = _RESNET_VECTOR_WIDTH if len(input_shape) != 3 else _RESNET_IMAGE_WIDTH
    if len(input_shape) != 3:
        layers = [nn.Linear(math.prod(input_shape), width), nn.ReLU()]
        for _i in range(depth):
            branch = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            layers += [_residual(branch), nn.ReLU()]
        layers.append(nn.Linear(width, n_classes))
        return nn.Sequential(*layers)
    channels = width
    layers = [*_conv_bn(input_shape[0], width), nn.ReLU()]
    for stage in range(3):
        if stage > 0:
            layers += [*_conv_bn(channels, 2 * channels, stride=2), nn.ReLU()]
            channels *= 2
        for _i in range(depth):
            branch = nn.Sequential(
                *_conv_bn(channels, channels), nn.ReLU(), *_conv_bn(channels, channels)
            )
            layers += [_residual(branch), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, n_classes)]
    return nn.Sequential(*layers)


def _width(default: int | None, note: str = "units or base channels") -> Option:
    return Option("width", "int", default, 1, MAX_WIDTH, description=note)


def _depth(default: int, note: str = "hidden layers or blocks") -> Option:
    return Option("depth", "int", default, 1, MAX_DEPTH, description=note)


def _mlp_layer_sizes(
    input_shape: tuple[int, ...],
    n_outputs: int,
    width: int,
    depth: int,
    activation: str,
    transformed: bool,
    **_: Any,
) -> list[int] | None:
    """The plain ReLU MLP's layer sizes (what the hypergradient tuner trains), or None."""
    if activation != "relu" or transformed:
        return None
    return [math.prod(input_shape), *[width] * depth, n_outputs]


_RESNET_IMAGE_WIDTH = 16
_RESNET_VECTOR_WIDTH = 128
MLP = Model(
    "mlp",
    "multilayer perceptron (optionally transformed)",
    _mlp,
    (
        _width(128),
        _depth(2),
        Option("activation", "str", "relu", choices=("relu", "tanh"), description="hidden units"),
        Option("transformed", "bool", False, description="transformed tanh units + shortcuts"),
        Option("transform_every", "int", 100, 1, 1_000_000, description="steps between updates"),
    ),
    inputs="flat",
    layer_sizes=_mlp_layer_sizes,
)
MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        MLP,
        Model(
            "cnn",
            "small CNN: conv-ReLU-pool blocks, linear head",
            _cnn,
            (_width(32), _depth(2)),
            inputs="image",
        ),
        Model(
            "vgg",
            "VGG13 with BatchNorm, width-scalable (width 64 = original)",
            _vgg,
            (_width(64, "base channels (the VGG13 shape fixes the depth)"),),
            inputs="image",
        ),
        Model(
            "resnet",
            "ResNet of optim.Residual blocks (conv or linear)",
            _resnet,
            (
                _width(None, f"units or base channels (default {_RESNET_IMAGE_WIDTH} for "
                       f"images, {_RESNET_VECTOR_WIDTH} for vectors)"),
                _depth(1, "residual blocks per stage"),
            ),
        ),
    )
}  # fmt: skip
CNN1D = Model(
    "cnn1d",
    "VGG-style 1-D CNN: Conv1d-BN-ReLU pairs, max-pooling, linear head",
    _cnn1d,
    (_width(32, "base channels"), _depth(3, "stages of two convolutions")),
    inputs="flat",
)
_ALL_MODELS = {**MODELS, CNN1D.name: CNN1D}  # CNN1D is paired with mnist1d only


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    *,
    width: int | None = None,
    depth: int | None = None,
    activation: str = "relu",
    transformed: bool = False,
) -> nn.Module:
    """Build built-in model `name` for inputs of `input_shape` (unflattened) and `n_classes`
    outputs; `None` width/depth take the model's defaults, and options the model does not
    declare are ignored."""
    model = _ALL_MODELS[name]
    given = {"width": width, "depth": depth, "activation": activation, "transformed": transformed}
    options = {
        o.name: given[o.name] if given.get(o.name) is not None else o.default for o in model.options
    }
    return model.build(input_shape, n_classes, **options)


def count_parameters(
    name: str, input_shape: tuple[int, ...], n_classes: int, **options: Any
) -> int:
    """Number of trainable parameters, counted on the meta device (nothing is allocated)."""
    with torch.device("meta"):
        model = build_model(name, input_shape, n_classes, **options)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
