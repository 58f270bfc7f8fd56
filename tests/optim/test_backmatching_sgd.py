"""bmp as an SGD: where every factor is 1 it is torch's SGD; EMA, clamp, warm-up; state."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optim import BackMatching, Residual

pytestmark = pytest.mark.usefixtures("float64_default")


def signs(*shape: int) -> Tensor:
    """A ±1 matrix: mean(x²) is exactly 1."""
    return torch.randn(*shape).sign()


def train(
    model: nn.Module, opt: torch.optim.Optimizer, batches: list[tuple[Tensor, Tensor]]
) -> None:
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()


def test_deep_linear_orthogonal_whitened_has_factors_one_and_equals_sgd() -> None:
    torch.manual_seed(0)
    n, batch = 6, 32
    layers = [nn.Linear(n, n) for _ in range(4)]
    for layer in layers:
        q, _ = torch.linalg.qr(torch.randn(n, n))
        with torch.no_grad():
            layer.weight.copy_(q)
            layer.bias.zero_()
    model = nn.Sequential(*layers)
    q, _ = torch.linalg.qr(torch.randn(batch, n))
    x = q * batch**0.5  # whitened: xᵀx / batch = I
    y = torch.randn(batch, n)
    reference = copy.deepcopy(model)
    opt = BackMatching(model, lr=0.3)
    train(model, opt, [(x, y)])
    sgd = torch.optim.SGD(reference.parameters(), lr=0.3)
    train(reference, sgd, [(x, y)])
    factors = opt.layer_factors()
    assert len(factors) == 8
    assert factors == pytest.approx(dict.fromkeys(factors, 1.0), rel=1e-12)
    for p, q_ in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q_, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("momentum", "nesterov", "weight_decay"),
    [
        (0.0, False, 0.0),
        (0.0, False, 0.01),
        (0.9, False, 0.0),
        (0.9, True, 0.05),
        (0.5, False, 0.1),
    ],
)
def test_momentum_and_weight_decay_are_torch_sgd_when_factors_are_one(
    momentum: float, nesterov: bool, weight_decay: float
) -> None:
    torch.manual_seed(1)
    model = nn.Linear(5, 3)  # top layer on ±1 inputs: factors are exactly 1/mean(x²) = 1 and 1
    reference = copy.deepcopy(model)
    options: dict[str, Any] = {
        "lr": 0.05,
        "momentum": momentum,
        "nesterov": nesterov,
        "weight_decay": weight_decay,
    }
    batches = [(signs(8, 5), torch.randn(8, 3)) for _ in range(6)]
    opt = BackMatching(model, **options)
    train(model, opt, batches)
    train(reference, torch.optim.SGD(reference.parameters(), **options), batches)
    assert opt.layer_factors() == pytest.approx({"weight": 1.0, "bias": 1.0}, rel=1e-12)
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("momentum", "nesterov"), [(0.0, False), (0.5, False), (0.5, True)])
def test_weight_decay_and_momentum_act_on_the_scaled_gradient(
    momentum: float, nesterov: bool
) -> None:
    """d = factor·g + wd·w (decay not rescaled), then torch SGD's momentum and Nesterov."""
    torch.manual_seed(10)
    model = nn.Linear(4, 2, bias=False)
    opt = BackMatching(model, lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=0.2)
    w = model.weight.detach().clone()
    buf = None
    for _ in range(3):
        x, y = 2 * signs(5, 4), torch.randn(5, 2)  # factor 1/mean(x²) = 1/4
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        g = model.weight.grad
        assert g is not None
        d = 0.25 * g + 0.2 * w
        if momentum:
            buf = d if buf is None else momentum * buf + d
            d = d + momentum * buf if nesterov else buf
        w = w - 0.1 * d
        opt.step()
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(("nesterov", "weight_decay"), [(False, 0.0), (False, 0.2), (True, 0.2)])
def test_momentum_follows_the_factor_from_step_to_step(nesterov: bool, weight_decay: float) -> None:
    """b ← μ·b + f·g + wd·w with a different factor at every step (the optimizer keeps b / f;
    this pins that the rescaling between steps is right)."""
    torch.manual_seed(11)
    model = nn.Linear(4, 2, bias=False)
    opt = BackMatching(model, lr=0.1, momentum=0.7, nesterov=nesterov, weight_decay=weight_decay)
    w = model.weight.detach().clone()
    buf = None
    for scale in [1.0, 2.0, 0.5, 3.0, 0.25]:
        x, y = scale * signs(5, 4), torch.randn(5, 2)  # factor 1/mean(x²) = 1/scale²
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        g = model.weight.grad
        assert g is not None
        d = g / scale**2 + weight_decay * w
        buf = d if buf is None else 0.7 * buf + d
        w = w - 0.1 * (d + 0.7 * buf if nesterov else buf)
        opt.step()
        assert opt.layer_factors()["weight"] == pytest.approx(1 / scale**2, rel=1e-12)
        torch.testing.assert_close(model.weight.detach(), w, rtol=1e-12, atol=1e-14)
        momentum = opt.state[model.weight]
        torch.testing.assert_close(
            momentum["momentum_factor"] * momentum["scaled_momentum"], buf, rtol=1e-12, atol=0
        )


def scaled_batches(scales: list[float]) -> list[tuple[Tensor, Tensor]]:
    return [(c * signs(4, 3), torch.randn(4, 1)) for c in scales]


def test_ema_averages_the_scalars() -> None:
    torch.manual_seed(2)
    model = nn.Linear(3, 1)
    opt = BackMatching(model, lr=1e-3, ema=0.6)
    seen = []
    s_hat = None
    for batch in scaled_batches([1.0, 2.0, 0.5, 3.0]):
        train(model, opt, [batch])
        s = 1.0 * batch[0].square().mean().item()  # mean(x²) = c²
        s_hat = s if s_hat is None else 0.6 * s_hat + 0.4 * s
        seen.append((opt.layer_factors()["weight"], 1 / s_hat))
    for got, want in seen:
        assert got == pytest.approx(want, rel=1e-12)


def test_clamp_bounds_the_factor() -> None:
    torch.manual_seed(3)
    model = nn.Linear(3, 1)
    opt = BackMatching(model, lr=1e-3, clamp=100.0)
    train(model, opt, scaled_batches([1e-3]))  # factor 1/mean(x²) = 1e6
    assert opt.layer_factors() == pytest.approx({"weight": 100.0, "bias": 1.0})
    train(model, opt, scaled_batches([1e3]))  # factor 1e-6
    assert opt.layer_factors()["weight"] == pytest.approx(0.01)


def test_warmup_ramps_geometrically_from_one() -> None:
    torch.manual_seed(4)
    model = nn.Linear(3, 1)
    opt = BackMatching(model, lr=1e-3, warmup_steps=4)
    got = []
    for batch in scaled_batches([2.0] * 6):  # factor 1/4
        train(model, opt, [batch])
        got.append(opt.layer_factors()["weight"])
    assert got == pytest.approx([0.25**0.25, 0.25**0.5, 0.25**0.75, 0.25, 0.25, 0.25], rel=1e-12)


def small_cnn() -> nn.Module:
    branch = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)
    )
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.Tanh(),
        Residual(branch),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 3),
    )


def cnn_batches(n: int, device: str = "cpu") -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [
        (torch.randn(6, 2, 6, 6, generator=g).to(device), torch.randn(6, 3, generator=g).to(device))
        for _ in range(n)
    ]


def test_state_dict_round_trips_and_training_resumes_identically() -> None:
    torch.manual_seed(6)
    options: dict[str, Any] = {
        "lr": 0.05,
        "momentum": 0.9,
        "nesterov": True,
        "ema": 0.5,
        "warmup_steps": 5,
    }
    batches = cnn_batches(6)
    model = small_cnn()
    opt = BackMatching(model, **options)
    train(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    saved_factors = opt.layer_factors()
    train(model, opt, batches[3:])

    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = BackMatching(resumed, **options)
    opt2.load_state_dict(saved_opt)
    assert opt2.layer_factors() == saved_factors
    assert opt2.state_dict()["backmatching"] == saved_opt["backmatching"]
    train(resumed, opt2, batches[3:])
    for p, q in zip(model.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q)
    assert opt.layer_factors() == opt2.layer_factors()


def test_without_saved_state_training_would_differ() -> None:
    """The resume test above can fail: dropping the EMA / warm-up state changes the run."""
    torch.manual_seed(6)
    options: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "ema": 0.5, "warmup_steps": 5}
    batches = cnn_batches(6)
    model = small_cnn()
    opt = BackMatching(model, **options)
    train(model, opt, batches[:3])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    del saved_opt["backmatching"]
    train(model, opt, batches[3:])
    resumed = small_cnn()
    resumed.load_state_dict(saved_model)
    opt2 = BackMatching(resumed, **options)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, batches[3:])
    pairs = zip(model.parameters(), resumed.parameters(), strict=True)
    assert not all(torch.equal(p, q) for p, q in pairs)


def test_lr_lives_in_the_param_group_for_schedulers() -> None:
    torch.manual_seed(7)
    model = nn.Linear(3, 1)
    opt = BackMatching(model, lr=0.1)
    assert opt.param_groups[0]["param_names"] == ["weight", "bias"]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = signs(4, 3), torch.randn(4, 1)
    train(model, opt, [(x, y)])
    scheduler.step()
    before = model.weight.detach().clone()
    opt.zero_grad()
    F.mse_loss(model(x), y).backward()
    grad = model.weight.grad
    assert grad is not None
    opt.step()
    torch.testing.assert_close(model.weight.detach(), before - 0.05 * grad)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    torch.manual_seed(8)
    cpu_model = small_cnn()
    gpu_model = copy.deepcopy(cpu_model).cuda()
    options: dict[str, Any] = {"lr": 0.05, "momentum": 0.9, "ema": 0.3}
    cpu_opt = BackMatching(cpu_model, **options)
    gpu_opt = BackMatching(gpu_model, **options)
    train(cpu_model, cpu_opt, cnn_batches(3))
    train(gpu_model, gpu_opt, cnn_batches(3, "cuda"))
    assert gpu_opt.layer_factors() == pytest.approx(cpu_opt.layer_factors(), rel=1e-8)
    for p, q in zip(cpu_model.parameters(), gpu_model.parameters(), strict=True):
        torch.testing.assert_close(p, q.cpu(), rtol=1e-8, atol=1e-10)


def test_float32_model_stays_float32() -> None:
    torch.manual_seed(9)
    model = small_cnn().float()
    opt = BackMatching(model, lr=0.05, momentum=0.9)
    train(model, opt, [(x.float(), y.float()) for x, y in cnn_batches(2)])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(isinstance(f, float) and f > 0 for f in opt.layer_factors().values())


def test_constructor_validates_each_option() -> None:
    model = nn.Linear(2, 1)
    for field, value in [
        ("lr", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1.0),
        ("ema", 1.0),
        ("clamp", 0.5),
        ("clamp", float("inf")),
        ("warmup_steps", -1),
    ]:
        with pytest.raises(ValueError, match=f"bmp: {field}: must be"):
            BackMatching(model, **{field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bmp: nesterov"):
        BackMatching(model, nesterov=True)
    with pytest.raises(ValueError, match="bmp: param_groups"):
        BackMatching(model).add_param_group({"params": [torch.zeros(1, requires_grad=True)]})
