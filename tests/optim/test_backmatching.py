"""bmp's per-layer factors equal hand computations from the layers' inputs and weights.

Every expected value is computed here from the definitions in docs/design.md — with `F.unfold` for
convolution patches, autograd for activation slopes and pooling Jacobians, and the layers'
inputs recomputed by hand — never from the optimizer's own statistics.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from optim import BackMatching, Residual
from optim.backmatching.layers import conv_counts

pytestmark = pytest.mark.usefixtures("float64_default")


def ms(t: Tensor) -> float:
    """mean(t²)."""
    return float(t.detach().square().mean())


def fro2(w: Tensor) -> float:
    return float(w.detach().square().sum())


def slope_sq(act: nn.Module, u: Tensor) -> float:
    """mean(f'(u)²) with f' from autograd."""
    u = u.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(act(u).sum(), u)
    return ms(g)


# The hand computations below are of the paper's form (the recursion through the blocks above,
# a convolution's traces summed over its positions); `BackMatching`'s defaults are revision 3's
# measured variant (local, means over positions), which its own tests pin.
PAPER_FORM = {"propagate": True, "mean_over_positions": False}


def one_step(model: nn.Module, x: Tensor, lr: float = 0.1, **options: float) -> BackMatching:
    opt = BackMatching(model, lr=lr, **{**PAPER_FORM, **options})  # type: ignore[arg-type]
    opt.zero_grad()
    out = model(x)
    (out.square().sum() / out.shape[0]).backward()
    opt.step()
    return opt


def jacobian_sq(f: Any, x: Tensor) -> float:
    """trace(JᵀJ) = ‖J‖_F² of `f` at one example `x` (a linear map: any x will do)."""
    return float(torch.autograd.functional.jacobian(f, x).square().sum())


def assert_factors(opt: BackMatching, expected: dict[str, float]) -> None:
    got = opt.layer_factors()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-10), name


def test_mlp_factors_and_update_match_hand_computation() -> None:
    torch.manual_seed(0)
    l1, act, l2, l3 = nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Linear(5, 3)
    model = nn.Sequential(l1, act, l2, nn.ReLU(), l3)
    x = torch.randn(16, 4) * 1.7
    with torch.no_grad():
        u1 = l1(x)
        t = torch.tanh(u1)
        r = torch.relu(l2(t))
    s3 = fro2(l3.weight) / 3
    s2 = fro2(l2.weight) / 5
    st = slope_sq(act, u1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = one_step(model, x, lr=0.1)
    expected = {
        "4.weight": 1 / ms(r),
        "4.bias": 1.0,
        "2.weight": 1 / (ms(t) * s3),
        "2.bias": 1 / s3,
        "0.weight": 1 / (ms(x) * s3 * s2 * st),
        "0.bias": 1 / (s3 * s2 * st),
    }
    assert_factors(opt, expected)
    for name, p in model.named_parameters():
        assert p.grad is not None
        want = before[name] - 0.1 * expected[name] * p.grad
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)


def test_conv_batchnorm_pooling_factors_with_padding_and_stride() -> None:
    """Conv → BatchNorm is one block (revision 2); padding taps do not count in s_z."""
    torch.manual_seed(1)
    c1 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    bn = nn.BatchNorm2d(4)
    c2 = nn.Conv2d(4, 6, (3, 2), stride=(1, 2), padding=(2, 0), dilation=(2, 1), bias=False)
    head = nn.Linear(6 * 2 * 1, 3)
    model = nn.Sequential(c1, bn, nn.ReLU(), c2, nn.AvgPool2d(2), nn.Flatten(), head)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 1.5, -2.0, 1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    x = torch.randn(5, 3, 9, 7)
    with torch.no_grad():
        a = F.conv2d(x, c1.weight, c1.bias, stride=2, padding=1)  # 5×4×5×4
        var = a.var(dim=(0, 2, 3), unbiased=False)
        h = torch.relu(bn(a))
        b = F.conv2d(h, c2.weight, None, stride=(1, 2), padding=(2, 0), dilation=(2, 1))
        flat = F.avg_pool2d(b, 2).flatten(1)
    assert a.shape[-2:] == (5, 4) and b.shape[-2:] == (5, 2) and flat.shape == (5, 12)

    def s_w_conv(inp: Tensor, conv: nn.Conv2d) -> float:
        padding = conv.padding
        assert isinstance(padding, tuple)
        patches = F.unfold(inp, conv.kernel_size, conv.dilation, padding, conv.stride)
        return float(patches.square().sum()) / (inp.shape[0] * patches.shape[1])

    head_sz = fro2(head.weight) / 3
    pool_sz = (2 * 1) * (4 / 16) / (2 * 1)  # P_out·(k²/d²)/min(P_in, P_out): 5×2 → 2×1
    c2_sz = jacobian_sq(lambda t: c2(t), h[:1]) / min(4 * 20, 6 * 10)
    assert c2_sz < 10 * fro2(c2.weight) / min(4 * 20, 6 * 10)  # padding taps left out
    gain = (bn.weight.detach().square() / (var + bn.eps)).mean()
    above_c2 = 1 / (head_sz * pool_sz)
    above_block = above_c2 / c2_sz  # the BatchNorm has no s_z of its own any more
    opt = one_step(model, x)
    assert_factors(
        opt,
        {
            "6.weight": 1 / ms(flat),
            "6.bias": 1.0,
            "3.weight": above_c2 / s_w_conv(h, c2),
            "1.weight": above_block / 20,  # P = 5·4 positions
            "1.bias": above_block / 20,
            "0.weight": above_block / (float(gain) * s_w_conv(x, c1)),
            "0.bias": above_block / (float(gain) * 20),
        },
    )


def test_grouped_and_same_padded_conv_weight_scalar() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(4, 6, 3, padding="same", groups=2)
    head = nn.Linear(6 * 25, 2)
    model = nn.Sequential(conv, nn.Flatten(), head)
    x = torch.randn(3, 4, 5, 5)
    # mean over output channels of Σ_p ‖patch of its group‖² / fan_in, batch mean
    per_group = [F.unfold(x[:, 2 * g : 2 * g + 2], 3, padding=1).square().sum() for g in (0, 1)]
    s_w = float(sum(per_group) / 2) / (3 * 2 * 9)
    head_sz = fro2(head.weight) / 2
    assert conv.bias is not None
    bias = conv.bias.detach()[:, None, None]
    c_sz = jacobian_sq(lambda t: conv(t) - bias, x[:1]) / min(100, 150)
    opt = one_step(model, x)
    factors = opt.layer_factors()
    assert factors["0.weight"] == pytest.approx(1 / (head_sz * s_w), rel=1e-10)
    assert factors["0.bias"] == pytest.approx(1 / (head_sz * 25), rel=1e-10)
    assert opt._scalars is not None
    assert opt._scalars[0] == pytest.approx(c_sz, rel=1e-10)  # groups: Σ_taps count·‖W_tap‖²


@pytest.mark.parametrize(
    ("train", "options"),
    [
        (True, {}),  # batch variance read back from the running estimate
        (True, {"momentum": 0.3}),
        (True, {"momentum": None}),  # cumulative average: computed from the input
        (True, {"track_running_stats": False}),
        (False, {}),  # eval mode: the running variance
    ],
)
def test_batchnorm1d_uses_the_variance_it_normalised_with(
    train: bool, options: dict[str, Any]
) -> None:
    torch.manual_seed(3)
    lin, bn, out = nn.Linear(5, 8), nn.BatchNorm1d(8, **options), nn.Linear(8, 2)
    model = nn.Sequential(lin, bn, nn.Tanh(), out)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        if bn.running_var is not None:
            bn.running_var.uniform_(0.5, 3.0)
    model.train(train)
    x = torch.randn(12, 5)
    with torch.no_grad():
        u = lin(x)
        if train:
            var = u.var(dim=0, unbiased=False)
            v = (u - u.mean(0)) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias
        else:
            assert bn.running_var is not None
            var = bn.running_var.clone()
            v = bn(u)
    gains = bn.weight.detach().square() / (var + bn.eps)
    above = 1 / (fro2(out.weight) / 2 * slope_sq(nn.Tanh(), v))
    rows = lin.weight.detach().square().sum(1)  # before the step moves them
    opt = one_step(model, x)
    factors = opt.layer_factors()
    assert factors["1.weight"] == pytest.approx(above, rel=1e-10)  # P = 1
    # Linear → BatchNorm1d is one block: s_W(W) = mean_c g_c · mean(x²), s_W(b) = mean_c g_c
    assert factors["0.weight"] == pytest.approx(above / float(gains.mean()) / ms(x), rel=1e-10)
    assert factors["0.bias"] == pytest.approx(above / float(gains.mean()), rel=1e-10)
    assert opt._scalars is not None  # s_z = Σ_c g_c ‖W_c‖² / min(n_in, n_out)
    s_z = float((gains * rows).sum()) / 5
    assert opt._scalars[0] == pytest.approx(s_z, rel=1e-10)


def test_residual_blocks_sum_their_paths() -> None:
    torch.manual_seed(4)
    l0 = nn.Linear(5, 5)
    a1, b1 = nn.Linear(5, 5), nn.Linear(5, 5)
    a2, b2, short = nn.Linear(5, 4), nn.Linear(4, 5), nn.Linear(5, 5)
    top = nn.Linear(5, 2)
    res1 = Residual(nn.Sequential(a1, nn.Tanh(), b1))
    res2 = Residual(nn.Sequential(a2, nn.ReLU(), b2), shortcut=short)
    model = nn.Sequential(l0, res1, nn.ReLU(), res2, top)
    x = torch.randn(10, 5)
    with torch.no_grad():
        z0 = l0(x)
        u1 = a1(z0)
        z1 = torch.relu(z0 + b1(torch.tanh(u1)))
        r2 = torch.relu(a2(z1))
        z2 = short(z1) + b2(r2)
    sz = {m: fro2(m.weight) / min(m.in_features, m.out_features) for m in (a1, b1, a2, b2, short)}
    tanh_sz = slope_sq(nn.Tanh(), u1)
    res2_sz = sz[short] + sz[a2] * 1.0 * sz[b2]
    res1_sz = 1.0 + sz[a1] * tanh_sz * sz[b1]
    up2 = 1 / (fro2(top.weight) / 2)  # above res2: the top Linear
    up1 = up2 / res2_sz  # above res1: res2, then ReLU (1)
    opt = one_step(model, x)
    assert_factors(
        opt,
        {
            "4.weight": 1 / ms(z2),
            "4.bias": 1.0,
            "3.shortcut.weight": up2 / ms(z1),
            "3.shortcut.bias": up2,
            "3.branch.2.weight": up2 / ms(r2),
            "3.branch.2.bias": up2,
            "3.branch.0.weight": up2 / sz[b2] / ms(z1),
            "3.branch.0.bias": up2 / sz[b2],
            "1.branch.2.weight": up1 / ms(torch.tanh(u1)),
            "1.branch.2.bias": up1,
            "1.branch.0.weight": up1 / (sz[b1] * tanh_sz * ms(z0)),
            "1.branch.0.bias": up1 / (sz[b1] * tanh_sz),
            "0.weight": up1 / res1_sz / ms(x),
            "0.bias": up1 / res1_sz,
        },
    )


@pytest.mark.parametrize(
    "act", [nn.Tanh(), nn.Sigmoid(), nn.GELU(), nn.GELU(approximate="tanh"), nn.SiLU()]
)
def test_smooth_activation_scalar_is_mean_squared_slope(act: nn.Module) -> None:
    torch.manual_seed(5)
    lin, out = nn.Linear(3, 7), nn.Linear(7, 2)
    model = nn.Sequential(lin, act, out)
    x = torch.randn(9, 3) * 2
    u = lin(x).detach()
    expected = 1 / (ms(x) * fro2(out.weight) / 2 * slope_sq(act, u))
    assert one_step(model, x).layer_factors()["0.weight"] == pytest.approx(expected, rel=1e-10)


class Scaled(nn.Module):
    """y = 3·u + sin(u): an activation bmp knows only through its declared slope."""

    def forward(self, u: Tensor) -> Tensor:
        return 3 * u + torch.sin(u)

    def backmatching_slope(self, u: Tensor) -> Tensor:
        return 3 + torch.cos(u)


def test_declared_slope_is_used() -> None:
    torch.manual_seed(6)
    lin, out = nn.Linear(3, 4), nn.Linear(4, 2)
    model = nn.Sequential(lin, Scaled(), out)
    x = torch.randn(6, 3)
    expected = 1 / (ms(x) * fro2(out.weight) / 2 * slope_sq(Scaled(), lin(x)))
    assert one_step(model, x).layer_factors()["0.weight"] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize(
    ("pool", "shape"),
    [
        (nn.AvgPool2d(3, stride=2), (2, 7, 9)),
        (nn.AvgPool2d(2, divisor_override=3), (2, 6, 4)),
        (nn.AdaptiveAvgPool2d((2, 3)), (2, 5, 7)),
        (nn.AdaptiveAvgPool2d(1), (2, 4, 4)),
        (nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 7)),
    ],
)
def test_pooling_scalar_is_trace_over_min_dimension(
    pool: nn.Module, shape: tuple[int, ...]
) -> None:
    torch.manual_seed(7)
    x = torch.randn(3, *shape)
    jac = torch.autograd.functional.jacobian(pool, x[:1, :1])  # one example, one channel
    p_out = pool(x[:1, :1]).numel()
    expected_sz = float(jac.square().sum()) / min(shape[1] * shape[2], p_out)
    head = nn.Linear(shape[0] * p_out, 2)
    model = nn.Sequential(nn.Conv2d(2, 2, 1), pool, nn.Flatten(), head)
    conv_sw = ms(x) * 1 * shape[1] * shape[2]  # 1×1 conv: Σ_p ‖patch‖² / C_in = P·mean(x²)
    expected = 1 / (fro2(head.weight) / 2 * expected_sz * conv_sw)
    assert one_step(model, x).layer_factors()["0.weight"] == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("train", [True, False])
def test_dropout_scalar(train: bool) -> None:
    torch.manual_seed(8)
    lin, out = nn.Linear(4, 6), nn.Linear(6, 2)
    model = nn.Sequential(lin, nn.Dropout(0.25), out).train(train)
    x = torch.randn(8, 4)
    drop_sz = 1 / 0.75**2 if train else 1.0
    expected = 1 / (ms(x) * fro2(out.weight) / 2 * drop_sz)
    assert one_step(model, x).layer_factors()["0.weight"] == pytest.approx(expected, rel=1e-10)


def test_statistics_pool_every_training_forward_and_ignore_no_grad_ones() -> None:
    torch.manual_seed(9)
    lin = nn.Linear(3, 1, bias=False)
    opt = BackMatching(lin, lr=0.1)
    x1, x2 = torch.randn(4, 3), 3 * torch.randn(6, 3)
    with torch.no_grad():
        lin(100 * torch.randn(5, 3))  # evaluation: not recorded
    (lin(x1).sum() + lin(x2).sum()).backward()
    opt.step()
    pooled = (fro2(x1) + fro2(x2)) / (x1.numel() + x2.numel())
    assert opt.layer_factors()["weight"] == pytest.approx(1 / pooled, rel=1e-12)


@pytest.mark.parametrize("layer", ["linear", "conv", "batchnorm"])
def test_long_histories_are_folded_without_changing_the_pooled_scalar(layer: str) -> None:
    torch.manual_seed(11)
    head = nn.Linear(2 * 25, 2)
    model: nn.Module = {
        "linear": nn.Linear(3, 2),
        "conv": nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Flatten(), head),
        "batchnorm": nn.BatchNorm1d(3),
    }[layer]
    shape = (4, 2, 5, 5) if layer == "conv" else (4, 3)
    opt = BackMatching(model, **PAPER_FORM)
    xs = [torch.randn(*shape) * (1 + i % 3) for i in range(70)]
    for x in xs[:-1]:
        model(x)  # recorded, never stepped: like a copy of the model
    block = opt._plan.blocks[0]
    assert len(block.values) <= 33
    head_sq = fro2(head.weight)  # before the step moves it
    model(xs[-1]).sum().backward()
    opt.step()
    factor = opt.layer_factors()["weight" if layer != "conv" else "0.weight"]
    if layer == "linear":
        assert factor == pytest.approx(sum(x.numel() for x in xs) / sum(fro2(x) for x in xs))
    elif layer == "batchnorm":
        assert factor == pytest.approx(1.0)  # P = 1; the folded mean is checked through s_z
        gains = [float((1 / (x.var(0, unbiased=False) + 1e-5)).mean()) for x in xs]
        assert opt._scalars is not None
        assert opt._scalars[0] == pytest.approx(sum(gains) / len(gains))
    else:
        patches = [F.unfold(x, 3, padding=1).square().sum() for x in xs]
        s_w = float(sum(patches)) / (len(xs) * 4 * 2 * 9)
        assert factor == pytest.approx(1 / (s_w * head_sq / 2))


def test_step_without_a_training_forward_is_an_error() -> None:
    lin = nn.Linear(3, 1)
    opt = BackMatching(lin)
    lin(torch.randn(2, 3)).sum().backward()
    opt.step()
    with pytest.raises(RuntimeError, match=r"bmp: model \(Linear\): no forward pass"):
        opt.step()


class TwoChildren(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(2, 2), nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))


class Wrapper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2)), r"bmp: 1 \(LayerNorm\): unsupported"),
        (nn.Sequential(nn.Linear(2, 2), TwoChildren()), r"bmp: 1 \(TwoChildren\): unsupported"),
        (nn.Sequential(nn.Conv3d(2, 2, 1)), r"bmp: 0 \(Conv3d\): unsupported"),
        (nn.Sequential(nn.Conv2d(2, 2, 3, padding_mode="reflect")), r"padding_mode 'reflect'"),
    ],
)
def test_unknown_layers_are_errors_naming_the_module(model: nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        BackMatching(model)


def test_tied_weights_are_an_error() -> None:
    lin = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="bmp: 1 \\(Linear\\): the same module is used twice"):
        BackMatching(nn.Sequential(lin, lin))


def test_single_child_wrapper_is_read_through_with_model_names() -> None:
    model = Wrapper()
    opt = one_step(model, torch.randn(4, 2))
    assert set(opt.layer_factors()) == {n for n, _ in model.named_parameters()}
    assert all(math.isfinite(f) and f > 0 for f in opt.layer_factors().values())


def test_frozen_parameters_are_skipped_but_their_layer_still_counts() -> None:
    torch.manual_seed(10)
    lin, out = nn.Linear(3, 4), nn.Linear(4, 2)
    out.weight.requires_grad_(False)
    model = nn.Sequential(lin, out)
    x = torch.randn(5, 3)
    opt = one_step(model, x)
    factors = opt.layer_factors()
    assert "1.weight" not in factors
    assert factors["0.weight"] == pytest.approx(1 / (ms(x) * fro2(out.weight) / 2), rel=1e-10)


@pytest.mark.parametrize(
    ("conv", "size"),
    [
        (nn.Conv2d(3, 2, 3, padding=1), (16, 16)),
        (nn.Conv2d(3, 2, 5, padding=2, dilation=(1, 2)), (12, 20)),
        (nn.Conv2d(3, 2, 5, padding="same"), (16, 12)),
        (nn.Conv2d(3, 2, 3), (9, 7)),
        (nn.Conv2d(3, 2, (3, 2), stride=(2, 3), padding=(1, 2)), (11, 10)),
    ],
)
def test_tap_counts_give_the_patch_energy(conv: nn.Conv2d, size: tuple[int, int]) -> None:
    torch.manual_seed(12)
    conv = conv.to(torch.float64)
    x = torch.randn(4, 3, *size)
    # Σ_p ‖patch_p‖²: every tap at every output position reads one x², summed over channels
    energy = x.square().sum(1, keepdim=True)
    ones = torch.ones(1, 1, *conv.kernel_size)
    want = float(F.conv2d(energy, ones, None, conv.stride, conv.padding, conv.dilation).sum())
    inputs, taps = conv_counts(conv, size, x)
    got = float((x.square() * inputs).sum())
    assert got == pytest.approx(want, rel=1e-12)
    # Σ_t count(t)·‖W[:, :, t]‖² is the squared Frobenius norm of the convolution's Jacobian
    trace = float((conv.weight.detach().square() * taps).sum())
    assert conv.bias is not None
    bias = conv.bias.detach()[:, None, None]
    assert trace == pytest.approx(jacobian_sq(lambda t: conv(t) - bias, x[:1]))
