"""The registry builds every scheme on the project's model shapes and validates every field."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optim
from optim import SCHEMES, Hyperparameter, Residual, build, validate


def mlp() -> nn.Module:
    """The mnist1d shape: 40 inputs, 10 classes."""
    return nn.Sequential(
        nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


def vgg_bn() -> nn.Module:
    layers: list[nn.Module] = []
    channels = 3
    for item in (4, "M", 8, "M", 8, 8, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
            channels = item
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(8 * 2 * 2, 10))


def resnet() -> nn.Module:
    def block(c_in: int, c_out: int, stride: int) -> nn.Module:
        branch = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        shortcut = None
        if stride != 1 or c_in != c_out:
            shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )
        return nn.Sequential(Residual(branch, shortcut), nn.ReLU())

    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        block(4, 4, 1),
        block(4, 8, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "mlp": (mlp, (16, 40)),
    "cnn": (small_cnn, (8, 3, 16, 16)),
    "vgg_bn": (vgg_bn, (8, 3, 16, 16)),
    "resnet": (resnet, (8, 3, 16, 16)),
}


def test_every_design_scheme_is_registered() -> None:
    assert set(SCHEMES) >= {"sgd", "adam", "adamw", "lars", "lamb", "bmp", "bmp_exact"}
    assert {n for n, s in SCHEMES.items() if s.needs_model} == {"bmp", "bmp_exact"}
    assert {n for n, s in SCHEMES.items() if s.layerwise} == {"bmp", "lars", "lamb"}


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_build_trains_every_scheme_on_every_model(name: str, model_name: str) -> None:
    torch.manual_seed(0)
    make, shape = MODELS[model_name]
    model = make()
    if name == "bmp_exact" and model_name != "mlp":
        with pytest.raises(ValueError, match="bmp_exact: "):
            build(name, model)
        return
    opt = build(name, model, lr=1e-3)
    assert opt.param_groups[0]["lr"] == 1e-3
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    if SCHEMES[name].layerwise:
        factors = opt.layer_factors()  # type: ignore[attr-defined]
        assert set(factors) == {n for n, p in model.named_parameters() if p.requires_grad}
        assert all(f > 0 and math.isfinite(f) for f in factors.values())


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_descriptions_are_consistent(name: str) -> None:
    sch = SCHEMES[name]
    assert sch.hyperparameters[0].name == "lr"
    names = [h.name for h in sch.hyperparameters]
    assert len(names) == len(set(names))
    for h in sch.hyperparameters:
        assert h.check(name, h.default) == h.default
        assert h.help
        if h.log:
            assert h.low is not None and h.low > 0
    assert validate(name, {}) == sch.defaults()


def out_of_range(h: Hyperparameter) -> list[object]:
    if h.type == "bool":
        return [1, "yes"]
    values: list[object] = ["0.1", True, math.nan]
    if h.low is not None:
        values.append(h.low - max(1.0, abs(h.low)))
    if h.high is not None:
        values.append(h.high * 2 + 1)
    if h.type == "int":
        values.append(1.5)
    return values


CASES = [
    (name, h, value)
    for name, sch in sorted(SCHEMES.items())
    for h in sch.hyperparameters
    for value in out_of_range(h)
]


@pytest.mark.parametrize(
    ("name", "h", "value"), CASES, ids=[f"{n}.{h.name}={v!r}" for n, h, v in CASES]
)
def test_bad_values_name_the_scheme_and_field(name: str, h: Hyperparameter, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{name}: {h.name}: "):
        build(name, mlp(), **{h.name: value})


def test_unknown_scheme_and_field() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'bmpx'; known: sgd, adam"):
        build("bmpx", mlp())
    with pytest.raises(ValueError, match=r"^bmp: unknown hyperparameter 'betas'; known: lr"):
        build("bmp", mlp(), betas=0.9)


def test_nesterov_without_momentum_names_the_scheme() -> None:
    for name in ("sgd", "bmp"):
        with pytest.raises(ValueError, match=f"^{name}: nesterov"):
            build(name, mlp(), nesterov=True)


def test_layerwise_schemes_are_exported() -> None:
    for cls in (optim.BackMatching, optim.BackMatchingExact, optim.LARS, optim.LAMB):
        assert issubclass(cls, torch.optim.Optimizer)
    assert isinstance(optim.Residual(nn.Identity())(Tensor([1.0])), Tensor)
