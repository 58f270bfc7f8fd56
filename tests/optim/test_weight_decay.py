"""`weight_decay` of every scheme, as `optim.build` makes it, is coupled or decoupled as the
scheme's paper (or docs/design.md, for bmp) defines it.

The signature is one step from a zero gradient, where only the decay moves the weights:
- coupled L2 (sgd; adam, whose paper has no decay: PyTorch adds `wd·w` to the gradient): the
  decay is a gradient. SGD shrinks `w` by `lr·wd`; Adam normalises `wd·w` like any gradient,
  so its first step moves every weight by about `lr`, whatever `wd`;
- decoupled (adamw, Loshchilov & Hutter 2017): `w ← w·(1 − lr·wd)`, outside the moments
  (PyTorch's parameterisation: the paper's `λ` is `lr·wd`; the schedule multiplies both, as
  the paper's `η_t`);
- inside the trust ratio (lamb, You et al. 2019: `r = m̂/(√v̂+ε) + λw`, ratio `‖w‖/‖r‖`): the
  ratio normalises the decay, so the step is `lr·w` whatever `λ`;
- lars (You et al. 2017): `λ·(g + β·w)` with the trust ratio `η‖w‖/(‖g‖+β‖w‖)`; at a zero
  gradient our ratio falls back to 1 (`optim.lars`), so the step is `lr·β·w`;
- bmp (docs/design.md): decay added after the per-layer factor, `d = f·g + wd·w`, so it is
  coupled L2 that the factor does not rescale.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optim
from optim.schedules import Schedule

pytestmark = pytest.mark.usefixtures("float64_default")

LR, WD = 0.1, 0.01


def _matrix() -> nn.Module:
    """One 2-D weight (layer-wise schemes leave 1-D tensors out of decay by default)."""
    torch.manual_seed(0)
    return nn.Linear(4, 3, bias=False)


def _zero_gradient_step(scheme: str, **hyperparameters: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights before, weights after) one step of `scheme` whose loss gradient is zero."""
    model = _matrix()
    optimizer = optim.build(scheme, model, lr=LR, weight_decay=WD, **hyperparameters)
    before = model.weight.detach().clone()
    (model(torch.randn(5, 4)) * 0.0).sum().backward()
    optimizer.step()
    return before, model.weight.detach().clone()


def test_sgd_decay_is_coupled_l2() -> None:
    before, after = _zero_gradient_step("sgd", momentum=0.9)
    torch.testing.assert_close(after, before * (1 - LR * WD), rtol=1e-14, atol=0)


def test_adam_decay_is_coupled_l2_normalised_like_a_gradient() -> None:
    before, after = _zero_gradient_step("adam")
    # m̂ = wd·w, v̂ = (wd·w)²: the first step is lr·sign(w), up to eps
    torch.testing.assert_close(before - after, LR * before.sign(), rtol=1e-4, atol=0)


def test_adamw_decay_is_decoupled() -> None:
    before, after = _zero_gradient_step("adamw")
    torch.testing.assert_close(after, before * (1 - LR * WD), rtol=1e-14, atol=0)


def test_lamb_decay_sits_inside_the_trust_ratio() -> None:
    before, after = _zero_gradient_step("lamb")
    # r = λw, ratio ‖w‖/‖λw‖ = 1/λ: the step is lr·w, not lr·λ·w
    torch.testing.assert_close(after, before * (1 - LR), rtol=1e-12, atol=0)


def test_lars_decay_at_a_zero_gradient_falls_back_to_ratio_one() -> None:
    before, after = _zero_gradient_step("lars", momentum=0.9)
    torch.testing.assert_close(after, before * (1 - LR * WD), rtol=1e-14, atol=0)


def test_bmp_decay_is_coupled_and_not_scaled_by_the_factor() -> None:
    for momentum in (0.0, 0.9):
        model = _matrix()
        optimizer = optim.build("bmp", model, lr=LR, weight_decay=WD, momentum=momentum)
        before = model.weight.detach().clone()
        (model(3.0 * torch.randn(64, 4)) * 0.0).sum().backward()
        optimizer.step()
        factor = optimizer.layer_factors()["weight"]  # type: ignore[operator]
        assert abs(factor - 1.0) > 0.5  # a factor far from 1, which the decay ignores
        torch.testing.assert_close(
            model.weight.detach(), before * (1 - LR * WD), rtol=1e-14, atol=0
        )


def test_the_schedule_multiplies_adamw_decay_as_the_papers_eta() -> None:
    """AdamW's `w ← w − η_t·λ·w`: with a schedule the decay follows `m(s)`."""
    model = _matrix()
    optimizer = optim.build("adamw", model, lr=LR, weight_decay=WD)
    schedule = Schedule(4, "linear", warmup_steps=2)
    rates = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(4):
        before = model.weight.detach().clone()
        model.zero_grad()
        (model(torch.randn(5, 4)) * 0.0).sum().backward()
        optimizer.step()
        rates.step()
        shrink = 1 - LR * schedule(step) * WD
        torch.testing.assert_close(model.weight.detach(), before * shrink, rtol=1e-14, atol=0)
