"""bmp revision 3: `mean_over_positions` reads a convolution block's output positions as samples.

Every expected value is computed here from the block's own statistics: `‖J‖_F²` of the block at
one example by autograd (BatchNorm statistics held constant), patch energies from `F.unfold`
(padding zeros included, as the weight's Jacobian sees them), BatchNorm gains from the batch
variance. Sum mode (revision 2) and mean mode (the default since the revision 3 comparison)
differ only in what is divided by the
number of output positions `P_out` and in the directions a position can move, `C_in·k` inputs
to `C_out` outputs.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import optim
from optim import BackMatching
from tests.optim.test_backmatching_revision2 import block_jacobian_sq, fro2, one_step

pytestmark = pytest.mark.usefixtures("float64_default")

PADDED = [
    (lambda: nn.Conv2d(3, 4, 3, padding=1), (5, 6)),
    (lambda: nn.Conv2d(2, 6, (3, 2), stride=(2, 1), padding=(2, 1), groups=2), (7, 5)),
    (lambda: nn.Conv1d(2, 5, 5, padding=2), (9,)),
]


def _unfold(x: Tensor, conv: Any) -> Tensor:
    """The patches `[B, C_in·k, P_out]` (a 1-D convolution as a 2-D one of height 1)."""
    if x.dim() == 3:
        x = x.unsqueeze(2)
        kernel, dilation = (1, conv.kernel_size[0]), (1, conv.dilation[0])
        padding, stride = (0, conv.padding[0]), (1, conv.stride[0])
    else:
        kernel, dilation, padding, stride = (
            conv.kernel_size,
            conv.dilation,
            conv.padding,
            conv.stride,
        )
    return F.unfold(x, kernel, dilation, padding, stride)


@pytest.mark.parametrize("propagate", [True, False])
@pytest.mark.parametrize("mean", [False, True], ids=["sum", "mean"])
@pytest.mark.parametrize(("make", "size"), PADDED)
def test_padded_conv_batchnorm_block_by_hand(
    make: Any, size: tuple[int, ...], mean: bool, propagate: bool
) -> None:
    torch.manual_seed(30)
    conv = make()
    c_in, c_out, k = conv.in_channels, conv.out_channels, math.prod(conv.kernel_size)
    bn = (nn.BatchNorm1d if len(size) == 1 else nn.BatchNorm2d)(c_out)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(6, c_in, *size)
    with torch.no_grad():
        a = conv(x)
        var = a.var(dim=(0, *range(2, a.dim())), unbiased=False)
        h = torch.relu(bn(a)).flatten(1)
    head = nn.Linear(h.shape[1], 3)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), head)
    p_in, p_out = math.prod(size), math.prod(a.shape[2:])
    gain = float((bn.weight.detach().square() / (var + bn.eps)).mean())
    trace = block_jacobian_sq(conv, bn, x[:1], var)  # one example: padding taps count nothing
    patches = _unfold(x, conv)  # [B, C_in·k, P_out], zeros where a tap reads padding
    energy = float(patches.square().sum()) / (x.shape[0] * c_in * k)  # Σ over positions
    if mean:
        s_z = trace / p_out / min(c_in * k, c_out)
        s_w, s_bias, s_norm = gain * energy / p_out, gain, 1.0
    else:
        s_z = trace / min(c_in * p_in, c_out * p_out)
        s_w, s_bias, s_norm = gain * energy, gain * p_out, float(p_out)
    above = 1 / (fro2(head.weight) / min(h.shape[1], 3)) if propagate else 1.0
    opt = one_step(model, x, propagate=propagate, mean_over_positions=mean)
    assert opt._scalars is not None
    assert opt._scalars[0] == pytest.approx(s_z, rel=1e-10)
    factors = opt.layer_factors()
    assert factors["0.weight"] == pytest.approx(above / s_w, rel=1e-10)
    assert factors["0.bias"] == pytest.approx(above / s_bias, rel=1e-10)
    assert factors["1.weight"] == pytest.approx(above / s_norm, rel=1e-10)
    assert factors["1.bias"] == pytest.approx(above / s_norm, rel=1e-10)
    assert factors["4.weight"] == pytest.approx(1 / float(h.square().mean()), rel=1e-10)


def test_without_padding_mean_mode_is_a_linear_layer_on_the_patches() -> None:
    """Positions as samples, literally: a Conv2d + BatchNorm2d block in mean mode has the
    scalars of a Linear + BatchNorm1d block applied to its patches, positions as batch rows."""
    torch.manual_seed(31)
    conv, bn = nn.Conv2d(3, 5, (3, 2), stride=(1, 2)), nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
    x = torch.randn(4, 3, 7, 8)
    conv_model = nn.Sequential(conv, bn, nn.ReLU(), nn.Flatten(), nn.LazyLinear(2))
    conv_model(x)  # materialise the lazy head
    rows = _unfold(x, conv).transpose(1, 2).reshape(-1, 3 * 6)  # [B·P_out, C_in·k]
    linear, norm = nn.Linear(18, 5), nn.BatchNorm1d(5)
    with torch.no_grad():  # before the step below changes them
        linear.weight.copy_(conv.weight.flatten(1))
        linear.bias.copy_(conv.bias)
        norm.weight.copy_(bn.weight)
    opt = one_step(conv_model, x, propagate=False, mean_over_positions=True)
    reference = one_step(nn.Sequential(linear, norm, nn.ReLU(), nn.Linear(5, 2)), rows)
    assert opt._scalars is not None and reference._scalars is not None
    assert opt._scalars[:5] == pytest.approx(reference._scalars[:5], rel=1e-10)


def _conv_factors(size: int, mean: bool, kernel: int) -> dict[str, float]:
    """The factors of one bmp step on a Conv+BN network at `size`×`size`, with the weights of
    seed 0 whatever the size (global pooling makes the head independent of it). A 1×1 kernel
    sees the 4×4 input with every pixel repeated (the same statistics per position); a larger
    one a fresh random input of that size."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, kernel, padding=kernel // 2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )
    torch.manual_seed(1 if kernel == 1 else size)
    x = torch.randn(32, 3, 4, 4) if kernel == 1 else torch.randn(32, 3, size, size)
    if kernel == 1:
        x = x.repeat_interleave(size // 4, 2).repeat_interleave(size // 4, 3)
    opt = optim.build("bmp", model, propagate=False, mean_over_positions=mean)
    F.cross_entropy(model(x), torch.randint(0, 10, (32,))).backward()
    opt.step()
    factors: dict[str, float] = opt.layer_factors()  # type: ignore[attr-defined]
    return factors


def test_mean_mode_weight_factor_does_not_change_with_spatial_size() -> None:
    """Same weights, a 4×4 and a 16×16 input: in sum mode the convolution's weight factor falls
    with the 16× more output positions, in mean mode it stays.

    Exactly with a 1×1 kernel on an input whose pixels are repeated 4×4 times (every position
    statistic is the 4×4 input's); with a 3×3 kernel, padding 1 and fresh random inputs up to
    sampling and border effects (measured: mean mode 1.06×, sum mode 0.066×)."""

    def ratio(mean: bool, kernel: int) -> float:
        large, small = _conv_factors(16, mean, kernel), _conv_factors(4, mean, kernel)
        return large["0.weight"] / small["0.weight"]

    assert ratio(mean=True, kernel=1) == pytest.approx(1.0, rel=1e-10)
    assert ratio(mean=False, kernel=1) == pytest.approx(1 / 16, rel=1e-10)
    mean_ratio, sum_ratio = ratio(mean=True, kernel=3), ratio(mean=False, kernel=3)
    assert abs(math.log(mean_ratio)) < math.log(1.2)
    assert 1 / 24 < sum_ratio < 1 / 10


def test_option_is_validated_recorded_and_leaves_linear_layers_alone() -> None:
    torch.manual_seed(32)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    x = torch.randn(9, 5)
    by_mode = []
    for mean in (False, True):
        opt = one_step(copy.deepcopy(model), x, mean_over_positions=mean)
        opt.remove_hooks()
        assert opt.state_dict()["param_groups"][0]["mean_over_positions"] is mean
        by_mode.append(opt.layer_factors())
    assert by_mode[0] == pytest.approx(by_mode[1], rel=1e-12)
    with pytest.raises(optim.HyperparameterError, match="bmp: mean_over_positions: must be"):
        optim.build("bmp", model, mean_over_positions=1)
    with pytest.raises(optim.HyperparameterError, match="mean_over_positions"):
        BackMatching(model, mean_over_positions="mean")  # type: ignore[arg-type]


def test_the_defaults_are_the_variant_the_schedule_comparison_measured_best() -> None:
    """`bmp`'s defaults, in the class and in the scheme registry a spec reads, are local rates
    with means over positions: `experiments/bmp_revision3.py` measured that variant best of
    the four on both normalised networks (README, Key findings)."""
    registry = optim.scheme("bmp")
    assert registry.hyperparameter("propagate").default is False
    assert registry.hyperparameter("mean_over_positions").default is True
    torch.manual_seed(33)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(3 * 16, 2))  # fmt: skip
    x = torch.randn(6, 2, 4, 4)
    explicit = one_step(copy.deepcopy(model), x, propagate=False, mean_over_positions=True)
    paper = one_step(copy.deepcopy(model), x, propagate=True, mean_over_positions=False)
    for make in (
        lambda m: BackMatching(m, lr=0.1),
        lambda m: optim.build("bmp", m, lr=0.1),
    ):
        m = copy.deepcopy(model)
        opt = make(m)
        out = m(x)
        (out.square().sum() / out.shape[0]).backward()
        opt.step()
        assert opt.layer_factors() == pytest.approx(explicit.layer_factors(), rel=1e-12)
        assert opt.layer_factors()["0.weight"] != pytest.approx(paper.layer_factors()["0.weight"])
