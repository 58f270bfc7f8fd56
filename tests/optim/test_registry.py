"""The registry builds every scheme on the project's model shapes and validates every field."""

from __future__ import annotations

import math
import pickle
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


def test_errors_carry_the_scheme_the_field_and_the_rule() -> None:
    with pytest.raises(optim.HyperparameterError) as refused:
        build("lars", mlp(), weight_decay=-1.0)
    error = refused.value
    assert (error.scheme, error.name, error.detail) == (
        "lars",
        "weight_decay",
        "must be >= 0, got -1",
    )
    assert str(error) == "lars: weight_decay: must be >= 0, got -1"
    with pytest.raises(optim.HyperparameterError) as unknown:
        build("bmp", mlp(), betas=0.9)
    assert unknown.value.name == ""
    assert unknown.value.detail.startswith("unknown hyperparameter 'betas'; known: lr")
    with pytest.raises(optim.UnsupportedModelError) as model:
        build("bmp_exact", small_cnn())
    assert model.value.scheme == "bmp_exact"
    assert str(model.value) == f"bmp_exact: {model.value.detail}"
    assert model.value.detail.startswith("0 (Conv2d): unsupported layer type")


@pytest.mark.parametrize(
    "error",
    [
        optim.HyperparameterError("lars", "weight_decay", "must be >= 0, got -1"),
        optim.HyperparameterError("bmp", "", "unknown hyperparameter 'betas'"),
        optim.UnsupportedModelError("bmp_exact", "0 (Conv2d): unsupported layer type"),
    ],
)
def test_errors_survive_pickling_as_themselves(error: ValueError) -> None:
    """A trial's error reaches the driver pickled (Ray); one that cannot be rebuilt arrives as
    Ray's UnserializableException, which reads as a dead worker and is retried."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def _momentum_schemes() -> list[str]:
    return [n for n, s in SCHEMES.items() if "momentum" in {h.name for h in s.hyperparameters}]


def test_momentum_schemes_are_the_expected_ones() -> None:
    assert set(_momentum_schemes()) == {"sgd", "lars", "bmp", "bmp_exact"}


@pytest.mark.parametrize("name", _momentum_schemes())
def test_the_registrys_momentum_bound_is_every_constructors(name: str) -> None:
    """At the registry's high bound the scheme builds; just above, the registry and the
    constructor itself (called directly, as a user of the class would) both refuse it,
    naming the field."""
    sch = SCHEMES[name]
    high = sch.hyperparameter("momentum").high
    assert high is not None and 0 < high < 1
    build(name, mlp(), momentum=high)
    above = math.nextafter(high, 1.0)
    with pytest.raises(optim.HyperparameterError) as registry:
        build(name, mlp(), momentum=above)
    model = mlp()
    target = model if sch.needs_model else model.parameters()  # what `build` hands it
    if sch.layerwise and not sch.needs_model:
        target = model.named_parameters()
    with pytest.raises(optim.HyperparameterError) as constructor:
        sch.constructor(target, **{**sch.defaults(), "momentum": above})
    assert (registry.value.scheme, registry.value.name) == (name, "momentum")
    assert (constructor.value.scheme, constructor.value.name) == (name, "momentum")


def test_nesterov_without_momentum_names_the_scheme() -> None:
    for name in ("sgd", "bmp"):
        with pytest.raises(ValueError, match=f"^{name}: nesterov"):
            build(name, mlp(), nesterov=True)


def test_layerwise_schemes_are_exported() -> None:
    for cls in (optim.BackMatching, optim.BackMatchingExact, optim.LARS, optim.LAMB):
        assert issubclass(cls, torch.optim.Optimizer)
    assert isinstance(optim.Residual(nn.Identity())(Tensor([1.0])), Tensor)
