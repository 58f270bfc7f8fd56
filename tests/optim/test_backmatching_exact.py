"""bmp_exact: one exact step on linear least squares is the least-squares solution; each block's
damped least-squares solution equals a hand computation; unsupported models are errors."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from optim import BackMatchingExact, Residual

pytestmark = pytest.mark.usefixtures("float64_default")


def half_squared_error(out: Tensor, y: Tensor, reduction: str) -> Tensor:
    per_example = 0.5 * (out - y).square().sum(1)
    return per_example.mean() if reduction == "mean" else per_example.sum()


@pytest.mark.parametrize("batch", [6, 11, 40])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_one_exact_step_on_linear_least_squares_is_lstsq(batch: int, reduction: str) -> None:
    torch.manual_seed(batch)
    n_in, n_out = 5, 3
    x, y = torch.randn(batch, n_in), torch.randn(batch, n_out)
    model = nn.Linear(n_in, n_out)
    opt = BackMatchingExact(model, lr=1.0, damping=0.0, loss_reduction=reduction)
    half_squared_error(model(x), y, reduction).backward()
    opt.step()
    design = torch.cat([x, torch.ones(batch, 1)], dim=1)
    solution = torch.linalg.lstsq(design, y).solution  # (n_in + 1) × n_out
    torch.testing.assert_close(model.weight.detach(), solution[:n_in].T, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(model.bias.detach(), solution[n_in], rtol=1e-9, atol=1e-10)


def damped(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """argmin_X ‖aX − b‖² + lam‖X‖², written out (pseudo-inverse when lam = 0)."""
    if lam == 0.0:
        return torch.linalg.pinv(a) @ b
    return torch.linalg.solve(a.T @ a + lam * torch.eye(a.shape[1]), a.T @ b)


@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("act", [nn.Tanh(), nn.ReLU()])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_two_layer_step_equals_hand_written_back_matching(
    act: nn.Module, damping: float, split: bool
) -> None:
    torch.manual_seed(1)
    l1, l2 = nn.Linear(4, 6), nn.Linear(6, 3)
    model = nn.Sequential(l1, act, l2)
    x, y = torch.randn(20, 4), torch.randn(20, 3)
    lr = 0.5
    w1, b1, w2, b2 = (p.detach().clone() for p in (l1.weight, l1.bias, l2.weight, l2.bias))
    with torch.no_grad():
        u = x @ w1.T + b1
        h = act(u)
        out = h @ w2.T + b2
    target = -lr * (out - y)  # lr × −∂(summed loss)/∂out
    # top block: parameters and input shift
    h1 = torch.cat([h, torch.ones(20, 1)], 1)
    d2 = damped(h1, target, damping * float(h1.square().sum()) / 7)
    dh = damped(w2, target.T, damping * float(w2.square().sum()) / 3).T
    if split:  # two parametrised blocks: the top one takes half, passes the other half down
        d2, dh = d2 / 2, dh / 2
    # activation: Δu = f'·Δh / (f'² + λ)
    u_ = u.clone().requires_grad_(True)
    (fp,) = torch.autograd.grad(act(u_).sum(), u_)
    if damping == 0.0:
        du = torch.where(fp != 0, dh / torch.where(fp != 0, fp, 1.0), 0.0)
    else:
        du = fp * dh / (fp.square() + damping * float(fp.square().mean()))
    x1 = torch.cat([x, torch.ones(20, 1)], 1)
    d1 = damped(x1, du, damping * float(x1.square().sum()) / 5)

    opt = BackMatchingExact(model, lr=lr, damping=damping, split=split)
    half_squared_error(model(x), y, "mean").backward()
    opt.step()
    for got, want in [
        (l2.weight, w2 + d2[:6].T),
        (l2.bias, b2 + d2[6]),
        (l1.weight, w1 + d1[:4].T),
        (l1.bias, b1 + d1[4]),
    ]:
        torch.testing.assert_close(got.detach(), want, rtol=1e-9, atol=1e-11)


def test_one_step_on_a_two_layer_chain_splits_the_target() -> None:
    """Width-16 chain of two Linear layers, one step at lr = 1. Every block matching the whole
    target moves the output about twice as far as asked (to first order) and the loss rises;
    equal shares make it fall at damping 0.1. The split is first-order only: without damping the
    minimum-norm input shift through a small W is large, the second-order term ΔW₂·Δh dominates
    and both variants raise the loss, the split one far less (the limitation `bmp_exact`'s help
    states)."""
    losses = {}
    for damping in (0.1, 0.0):
        for split in (False, True):
            torch.manual_seed(3)
            model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
            x, y = torch.randn(64, 16), torch.randn(64, 16)
            opt = BackMatchingExact(model, lr=1.0, damping=damping, split=split)
            before = half_squared_error(model(x), y, "mean")
            before.backward()
            opt.step()
            with torch.no_grad():
                after = half_squared_error(model(x), y, "mean")
            losses[damping, split] = (float(before.detach()), float(after))
    print(f"width-16 two-layer chain, mean loss before, after one step: {losses}")
    assert losses[0.1, False][1] > losses[0.1, False][0]  # overshoot
    assert losses[0.1, True][1] < 0.8 * losses[0.1, True][0]
    assert losses[0.0, True][1] < losses[0.0, False][1] / 10


def test_momentum_accumulates_the_solved_changes() -> None:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    plain = copy.deepcopy(model)
    theta0 = [p.detach().clone() for p in model.parameters()]
    opt = BackMatchingExact(model, lr=0.2, damping=0.1, momentum=0.7)
    ref = BackMatchingExact(plain, lr=0.2, damping=0.1)
    for x, y in [(torch.randn(10, 3), torch.randn(10, 2)) for _ in range(2)]:
        theta1 = [p.detach().clone() for p in plain.parameters()]
        for net, o in ((model, opt), (plain, ref)):
            o.zero_grad()
            half_squared_error(net(x), y, "mean").backward()
            o.step()
    # both took the same first step Δ₁ = θ₁ − θ₀; then θ₂ = θ₁ + μ·Δ₁ + Δ₂
    for p, p0, p1, q in zip(model.parameters(), theta0, theta1, plain.parameters(), strict=True):
        delta2 = q.detach() - p1
        torch.testing.assert_close(p.detach(), p1 + 0.7 * (p1 - p0) + delta2)
        assert not torch.allclose(p.detach(), q.detach())


def test_conv_and_residual_models_are_errors() -> None:
    with pytest.raises(ValueError, match=r"bmp_exact: 0 \(Conv2d\): unsupported"):
        BackMatchingExact(nn.Sequential(nn.Conv2d(1, 1, 3)))
    with pytest.raises(ValueError, match="bmp_exact: 1: a sum of paths"):
        BackMatchingExact(nn.Sequential(nn.Linear(2, 2), Residual(nn.Linear(2, 2))))
    with pytest.raises(ValueError, match=r"bmp_exact: 1 \(BatchNorm1d\): unsupported"):
        BackMatchingExact(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


def test_step_needs_the_output_gradient() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1))
    opt = BackMatchingExact(model)
    model(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="bmp_exact: no gradient of the loss"):
        opt.step()


def test_constructor_validates() -> None:
    model = nn.Linear(2, 1)
    for field, value in [("lr", -1.0), ("damping", -0.1), ("momentum", 1.0)]:
        with pytest.raises(ValueError, match=f"bmp_exact: {field}: must be"):
            BackMatchingExact(model, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bmp_exact: loss_reduction"):
        BackMatchingExact(model, loss_reduction="none")
