"""Transformed tanh blocks: function invariance, the statistics they reach, plumbing, training."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import optim
from optim.transformed import (
    TransformationScheduler,
    TransformedBlock,
    TransformedTanh,
    tanh_mlp,
    transformed_mlp,
    update_transformations,
)


def _blocks(model: nn.Module) -> list[TransformedBlock]:
    return [m for m in model.modules() if isinstance(m, TransformedBlock)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _scramble(model: nn.Module, seed: int) -> None:
    """Give every parameter (the zero-initialised shortcuts too) a generic value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.7)


def _batch(n: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g, dtype=torch.float64) * 1.5 + 0.3


@pytest.mark.parametrize("scale", [False, True])
def test_updates_leave_the_function_unchanged(scale: bool) -> None:
    torch.manual_seed(0)
    model = transformed_mlp(6, [9, 7, 8], 4, scale=scale, momentum=0.5).double()
    _scramble(model, 1)
    fixed = _batch(32, 6, 2)
    for step in range(4):
        model.train()
        model(_batch(64, 6, 10 + step))  # statistics from other batches than the fixed one
        model.eval()
        before = model(fixed)
        alphas = [b.activation.alpha.clone() for b in _blocks(model)]
        update_transformations(model)
        after = model(fixed)
        assert _rel(after, before) <= 1e-10
        blocks = _blocks(model)
        moved = [
            float((b.activation.alpha - a).abs().max()) for b, a in zip(blocks, alphas, strict=True)
        ]
        assert min(moved) > 1e-3  # the update really changed something to compensate
    gammas = torch.cat([b.activation.gamma for b in _blocks(model)])
    if scale:
        assert float((gammas - 1).abs().max()) > 1e-2
    else:
        assert torch.equal(gammas, torch.ones_like(gammas))


@pytest.mark.parametrize("seed", range(20))
def test_invariance_holds_for_random_shapes(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n_in, n_out, depth = (int(v) for v in torch.randint(1, 6, (3,), generator=g))
    hidden = [int(v) for v in torch.randint(1, 7, (min(depth, 3),), generator=g)]
    scale = bool(seed % 2)
    torch.manual_seed(seed)
    model = transformed_mlp(n_in, hidden, n_out, scale=scale).double()
    _scramble(model, seed)
    x = _batch(16, n_in, seed + 1)
    for _ in range(2):
        model.train()
        model(x)
        model.eval()
        before = model(x)
        update_transformations(model)
        assert _rel(model(x), before) <= 1e-10, (n_in, hidden, n_out, scale)


@pytest.mark.parametrize("scale", [False, True])
def test_statistics_on_the_batch_after_updates(scale: bool) -> None:
    torch.manual_seed(3)
    block = TransformedBlock(5, 12, 3, scale=scale, momentum=1.0, eps=1e-12).double()
    _scramble(block, 4)
    for seed in (5, 6, 7):  # momentum=1: the running statistics are the last batch's
        x = _batch(200, 5, seed)
        block.train()
        block(x)
        block.update_transformations()
        block.eval()
        u = block.inner(x).detach()
        h = block.activation(u)
        slope = block.activation.backmatching_slope(u)
        assert float(h.mean(0).abs().max()) < 1e-10
        assert float(slope.mean(0).abs().max()) < 1e-10
        if scale:
            torch.testing.assert_close(h.pow(2).mean(0), torch.ones(12, dtype=torch.float64))
        else:
            assert not torch.allclose(h.pow(2).mean(0), torch.ones(12, dtype=torch.float64))


def test_running_moments_are_an_exponential_average() -> None:
    act = TransformedTanh(4, momentum=0.25).double()
    u1, u2 = _batch(10, 4, 1), _batch(10, 4, 2)

    def moments(u: torch.Tensor) -> torch.Tensor:
        t = torch.tanh(u)
        return torch.stack([t, u, t * t, t * u, u * u]).mean(1)

    act(u1)
    torch.testing.assert_close(act.moments, moments(u1))
    act(u2)
    torch.testing.assert_close(act.moments, 0.75 * moments(u1) + 0.25 * moments(u2))
    act.eval()
    act(_batch(10, 4, 3))  # eval forwards do not count
    assert int(act.num_batches_tracked) == 2


def test_update_without_statistics_or_without_transform_changes_nothing() -> None:
    torch.manual_seed(0)
    fresh = transformed_mlp(3, [4], 2).double()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    update_transformations(fresh)
    assert all(torch.equal(state[k], v) for k, v in fresh.state_dict().items())

    plain = transformed_mlp(3, [4], 2, transform=False).double()
    _scramble(plain, 1)
    plain(_batch(8, 3, 2))
    params = [p.clone() for p in plain.parameters()]
    update_transformations(plain)
    assert all(torch.equal(a, b) for a, b in zip(params, plain.parameters(), strict=True))
    assert not _blocks(plain)[0].activation.alpha.any()


def test_forward_is_the_sum_of_the_backmatching_paths() -> None:
    torch.manual_seed(0)
    block = TransformedBlock(4, 6, 3).double()
    _scramble(block, 2)
    x = _batch(8, 4, 3)
    block(x)
    block.update_transformations()
    paths = block.backmatching_paths()
    assert paths[0] is block.nonlinear and paths[1] is block.shortcut
    torch.testing.assert_close(block(x), sum(p(x) for p in paths), rtol=0, atol=1e-14)


def test_backmatching_slope_is_the_derivative() -> None:
    act = TransformedTanh(5, scale=True).double()
    act(_batch(30, 5, 1))
    with torch.no_grad():
        act.alpha.copy_(torch.linspace(-0.9, -0.1, 5))
        act.beta.copy_(torch.linspace(-0.3, 0.3, 5))
        act.gamma.copy_(torch.linspace(0.5, 2.0, 5))
    u = _batch(7, 5, 2).requires_grad_(True)
    (grad,) = torch.autograd.grad(act(u).sum(), u)
    torch.testing.assert_close(act.backmatching_slope(u.detach()), grad)


def test_gradients_reach_a_b_c_and_both_biases() -> None:
    torch.manual_seed(0)
    block = TransformedBlock(4, 6, 3, scale=True)
    x = torch.randn(16, 4)
    block(x)
    block.update_transformations()
    block(x).pow(2).sum().backward()
    named = dict(block.named_parameters())
    assert set(named) == {
        "nonlinear.0.weight",  # B
        "nonlinear.0.bias",  # b
        "nonlinear.2.weight",  # A
        "shortcut.weight",  # C
        "shortcut.bias",  # d
    }
    for name, p in named.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert float(p.grad.abs().sum()) > 0, name


def test_state_dict_round_trips_the_transformation() -> None:
    torch.manual_seed(0)
    model = transformed_mlp(5, [8, 6], 3, scale=True).double()
    _scramble(model, 3)
    model(_batch(20, 5, 4))
    update_transformations(model)
    model(_batch(20, 5, 5))
    state = model.state_dict()
    for key in ("alpha", "beta", "gamma", "moments", "num_batches_tracked"):
        assert f"0.nonlinear.1.{key}" in state
    copy = transformed_mlp(5, [8, 6], 3, scale=True).double()
    copy.load_state_dict(state)
    for key, value in copy.state_dict().items():
        assert torch.equal(value, state[key]), key
    model.eval()
    copy.eval()
    x = _batch(9, 5, 6)
    assert torch.equal(copy(x), model(x))
    update_transformations(model)  # same statistics: the copy updates identically
    update_transformations(copy)
    assert torch.equal(copy(x), model(x))


def test_invalid_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="momentum"):
        TransformedTanh(3, momentum=0.0)
    with pytest.raises(ValueError, match="eps"):
        TransformedTanh(3, eps=0.0)
    with pytest.raises(ValueError, match="n_hidden"):
        TransformedBlock(3, 0, 2)
    with pytest.raises(ValueError, match="every"):
        TransformationScheduler(nn.Linear(2, 2), every=0)
    with pytest.raises(ValueError, match=r"hidden\[1\]"):
        transformed_mlp(3, [4, 0], 2)
    with pytest.raises(ValueError, match="hidden"):
        tanh_mlp(3, [], 2)


def test_scheduler_updates_every_k_steps() -> None:
    model = transformed_mlp(3, [4], 2)
    model(torch.randn(8, 3))
    scheduler = TransformationScheduler(model, every=3)
    assert [scheduler.step() for _ in range(7)] == [False, False, True, False, False, True, False]
    assert _blocks(model)[0].activation.alpha.any()


def test_tanh_mlp_has_the_same_tanh_widths() -> None:
    plain = tanh_mlp(5, [7, 6], 3)
    assert [m.out_features for m in plain if isinstance(m, nn.Linear)] == [7, 6, 3]
    transformed = transformed_mlp(5, [7, 6], 3)
    assert [b.activation.n for b in _blocks(transformed)] == [7, 6]
    assert transformed(torch.randn(2, 5)).shape == (2, 3)


def _two_moons(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    angle = torch.rand(n, generator=g) * torch.pi
    label = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    x = torch.where(label[:, None] == 1, torch.tensor([1.0, 0.5]) - x, x)
    return x + 0.1 * torch.randn(n, 2, generator=g), label


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> tuple[float, float]:
    x, y = _two_moons(256, 0)
    loss_fn = nn.CrossEntropyLoss()
    scheduler = TransformationScheduler(model, every=10)
    model.eval()
    with torch.no_grad():
        first = float(loss_fn(model(x), y))
    model.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        opt.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        return first, float(loss_fn(model(x), y))


@pytest.mark.parametrize("scale", [False, True])
def test_trains_with_sgd(scale: bool) -> None:
    torch.manual_seed(0)
    model = transformed_mlp(2, [16, 16], 2, scale=scale)
    first, last = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), 300)
    assert last < 0.5 * first


def test_trains_with_bmp() -> None:
    torch.manual_seed(0)
    model = transformed_mlp(2, [16, 16], 2)
    first, last = _train(model, optim.build("bmp", model, lr=0.1), 300)
    assert last < 0.5 * first


def test_the_block_is_part_of_optims_public_api() -> None:
    import optim

    model = optim.transformed_mlp(4, [8, 8], 3)
    assert sum(isinstance(m, optim.TransformedBlock) for m in model.modules()) == 2
    optim.update_transformations(model)  # the one call a training loop makes
