"""LARS and LAMB steps equal the papers' formulas written out by hand on a tiny model."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optim import LAMB, LARS

Layerwise = type[LARS] | type[LAMB]


pytestmark = pytest.mark.usefixtures("float64_default")


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


BATCHES = [
    (torch.randn(8, 3, generator=torch.Generator().manual_seed(i), dtype=torch.float64), i)
    for i in range(3)
]


def gradients(model: nn.Module, x: Tensor, seed: int) -> list[Tensor]:
    model.zero_grad()
    y = torch.randn(8, 2, generator=torch.Generator().manual_seed(100 + seed), dtype=x.dtype)
    F.mse_loss(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]


def norm(t: Tensor) -> float:
    return float(t.norm())


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_matches_algorithm_1(exclude: bool) -> None:
    lr, m, wd, eta = 0.5, 0.9, 0.01, 0.02
    model, hand = tiny(), tiny()
    opt = LARS(model.named_parameters(), lr, m, wd, eta, exclude_bias_and_norm=exclude)
    velocity = [torch.zeros_like(p) for p in hand.parameters()]
    for x, seed in BATCHES:
        grads = gradients(hand, x, seed)
        ratios = {}
        with torch.no_grad():
            for (name, w), g, v in zip(hand.named_parameters(), grads, velocity, strict=True):
                adapted = not (exclude and w.dim() == 1)
                local = eta * norm(w) / (norm(g) + wd * norm(w)) if adapted else 1.0
                decay = wd if adapted else 0.0
                v.mul_(m).add_(lr * local * (g + decay * w))
                w.sub_(v)
                ratios[name] = local
        gradients(model, x, seed)
        opt.step()
        assert opt.layer_factors() == pytest.approx(ratios, rel=1e-12)
    for p, q in zip(model.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("exclude", [True, False])
def test_lamb_matches_algorithm_2(exclude: bool) -> None:
    lr, b1, b2, eps, wd = 0.01, 0.8, 0.95, 1e-6, 0.1
    model, hand = tiny(), tiny()
    opt = LAMB(model.named_parameters(), lr, b1, b2, eps, wd, exclude_bias_and_norm=exclude)
    first = [torch.zeros_like(p) for p in hand.parameters()]
    second = [torch.zeros_like(p) for p in hand.parameters()]
    for t, (x, seed) in enumerate(BATCHES, start=1):
        grads = gradients(hand, x, seed)
        ratios = {}
        with torch.no_grad():
            for (name, w), g, mt, vt in zip(
                hand.named_parameters(), grads, first, second, strict=True
            ):
                mt.copy_(b1 * mt + (1 - b1) * g)
                vt.copy_(b2 * vt + (1 - b2) * g * g)
                m_hat, v_hat = mt / (1 - b1**t), vt / (1 - b2**t)
                adapted = not (exclude and w.dim() == 1)
                r = m_hat / (v_hat.sqrt() + eps) + (wd * w if adapted else 0.0)
                ratio = norm(w) / norm(r) if adapted else 1.0
                w.sub_(lr * ratio * r)
                ratios[name] = ratio
        gradients(model, x, seed)
        opt.step()
        assert opt.layer_factors() == pytest.approx(ratios, rel=1e-12)
    for p, q in zip(model.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_zero_weights_fall_back_to_ratio_one(cls: Layerwise) -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.zero_()
    opt = cls(model.named_parameters())
    F.mse_loss(model(torch.randn(4, 3)), torch.randn(4, 2)).backward()
    opt.step()
    assert opt.layer_factors()["weight"] == 1.0
    assert torch.isfinite(model.weight).all() and model.weight.abs().sum() > 0


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_plain_parameters_get_positional_labels(cls: Layerwise) -> None:
    model = tiny()
    opt = cls(model.parameters())
    gradients(model, torch.randn(8, 3), 0)
    opt.step()
    assert set(opt.layer_factors()) == {"0.0", "0.1", "0.2", "0.3"}


@pytest.mark.parametrize("cls", [LARS, LAMB])
def test_state_dict_round_trips_and_training_resumes(cls: Layerwise) -> None:
    model = tiny()
    opt = cls(model.named_parameters(), lr=0.05)
    gradients(model, BATCHES[0][0], 0)
    opt.step()
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for x, seed in BATCHES[1:]:
        gradients(model, x, seed)
        opt.step()
    resumed = tiny()
    resumed.load_state_dict(saved_model)
    opt2 = cls(resumed.named_parameters(), lr=0.05)
    opt2.load_state_dict(saved_opt)
    for x, seed in BATCHES[1:]:
        gradients(resumed, x, seed)
        opt2.step()
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("cls", "field", "value"),
    [
        (LARS, "lr", 0.0),
        (LARS, "momentum", 1.0),
        (LARS, "weight_decay", -1.0),
        (LARS, "trust_coefficient", 0.0),
        (LAMB, "lr", math.inf),
        (LAMB, "beta1", 1.0),
        (LAMB, "beta2", -0.1),
        (LAMB, "eps", 0.0),
        (LAMB, "weight_decay", -1.0),
    ],
)
def test_constructors_validate(cls: Layerwise, field: str, value: float) -> None:
    options: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=f"{cls.__name__.lower()}: {field}: must be"):
        cls(tiny().parameters(), **options)
