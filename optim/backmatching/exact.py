"""`BackMatchingExact` (`bmp_exact`): exact back-matching propagation for MLPs.

Zhang, Chen, Liu 2018 (arXiv 1802.09750) write the network as a chain of blocks
`z[l+1] = F_l(W_l, z[l])` and propagate *target shifts* down it. The shift of the network's
output is `Δz[L] = −lr · ∂(Σ_batch loss)/∂z[L]`, the gradient of the batch's *summed* loss
(the optimizer multiplies the gradient it sees by the batch size when `loss_reduction="mean"`,
the default, i.e. when the loss given to `backward()` is the batch mean of per-example losses).
Each block, from the top, solves two damped least-squares problems, linearised at the current
point, with the block's input `X` (rows = examples) and weight `W` (shape `n_out × n_in`):

- parameters: `min_Δθ ‖X̃·Δθ − Δz_out‖² + λ_W·‖Δθ‖²` with `X̃ = [X, 1]` (the column of ones
  when the layer has a bias), so `Δθ = (X̃ᵀX̃ + λ_W·I)⁻¹ X̃ᵀ Δz_out` and `[W b] += Δθᵀ`;
- input shift: `min_Δz ‖Δz·Wᵀ − Δz_out‖² + λ_z·‖Δz‖²`, so `Δz_in = Δz_out·W·(WᵀW + λ_z·I)⁻¹`;
- elementwise activation `y = f(u)`: `Δu = f'(u)·Δy / (f'(u)² + λ_f)`.

Choices where the paper is silent:
- damping is relative: `λ = damping × the block's bmp scalar` (mean eigenvalue of the normal
  matrix): `λ_W = damping · trace(X̃ᵀX̃)/(n_in + 1)` (n_in without bias),
  `λ_z = damping · ‖W‖_F² / min(n_in, n_out)`, `λ_f = damping · mean(f'(u)²)`, so the same
  `damping` means the same thing in every layer and at every scale;
- `damping = 0` uses the pseudo-inverse (minimum-norm solutions; a ReLU's inactive units get
  no shift); then one step with `lr = 1` on linear least squares lands on the least-squares
  solution whatever the batch size (batch ≥ inputs + 1);
- a chain of K parametrised blocks splits the output target into equal shares (`split=True`,
  the default): a Linear layer with k parametrised blocks at or below it solves for `1/k` of
  its output target with its parameters and passes the remaining `(k − 1)/k` down as its
  input shift, so to first order every Linear layer produces `1/K` of the network's target and
  together they produce it once. `split=False` is the literal reading, every block matching its
  whole target: on a chain the first-order output shift is K times the target and one step
  overshoots. The split is first-order only: the product of the changes of two blocks
  (`ΔW₂·Δh`) is not matched, and without damping the minimum-norm input shift through a small
  `W` is large enough for it to dominate. Measured on a width-16 chain of two Linear layers,
  one step at lr = 1 (`tests/optim/test_backmatching_exact.py`): damping 0.1, the mean loss
  goes 9.31 → 7.13 with the split and 9.31 → 12.0 without; damping 0, both raise it (the split
  about 16× less). With one parametrised block both are the same;
- every block's input shift is computed with the weights before this step's update;
- `momentum = μ`: heavy ball on the solved change, `v ← μ·v + Δθ`, `θ ← θ + v`;
- inputs with more than two dimensions are flattened to rows (leading dimensions as examples).

Supported: chains (`nn.Sequential`, nested) of `Linear`, `ReLU`, `Tanh`, `Sigmoid`, `GELU`,
`SiLU`, modules declaring `backmatching_slope(u)`, `Identity` and `Flatten`; anything else is a
`ValueError` naming the module (use `bmp` for convolutions, normalisation and residual blocks).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optim._checks import UnsupportedModelError, require, require_momentum, require_rate
from optim._layerwise import evaluate_closure
from optim.backmatching.activations import is_activation, slope
from optim.backmatching.structure import Chain, Leaf, Node, describe, parse

__all__ = ["BackMatchingExact", "MemberSolver", "solve"]

_PASS = (nn.Identity, nn.Flatten)


def _supported(module: nn.Module) -> bool:
    return type(module) in (nn.Linear, *_PASS) or is_activation(module)


_ADVICE = "the exact mode solves chains of Linear layers and elementwise activations (use bmp)"


def _chain(node: Node) -> list[Leaf]:
    if isinstance(node, Leaf):
        return [node]
    if isinstance(node, Chain):
        return [leaf for child in node.nodes for leaf in _chain(child)]
    raise UnsupportedModelError(
        "bmp_exact",
        f"{node.path or 'model'}: a sum of paths (residual block) is not a chain; " + _ADVICE,
    )


class BackMatchingExact(torch.optim.Optimizer):
    """Exact back-matching propagation (`bmp_exact`); formulas in the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        damping: float = 0.1,
        momentum: float = 0.0,
        loss_reduction: str = "mean",
        split: bool = True,
    ) -> None:
        require_rate("bmp_exact", lr)
        ok_damping = damping >= 0 and math.isfinite(damping)
        require("bmp_exact", "damping", damping, ok_damping, ">= 0")
        require_momentum("bmp_exact", momentum)
        require("bmp_exact", "split", split, isinstance(split, bool), "true or false")
        ok_reduction = loss_reduction in ("mean", "sum")
        require("bmp_exact", "loss_reduction", loss_reduction, ok_reduction, "'mean' or 'sum'")
        self._layers, named = _read(model)
        defaults = {"lr": lr, "damping": damping, "momentum": momentum, "split": split}
        super().__init__([{"params": named}], defaults)
        self.loss_reduction = loss_reduction
        self._inputs: dict[int, tuple[Tensor, Tensor]] = {}
        self._output_grad: Tensor | None = None
        self._handles = [model.register_forward_hook(self._watch_output)]
        for i, leaf in enumerate(self._layers):
            self._handles.append(leaf.module.register_forward_hook(self._recorder(i)))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if torch.is_grad_enabled():
                self._inputs[index] = (args[0].detach(), output.detach())

        return record

    def _watch_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            output.register_hook(self._keep_output_grad)

    def _keep_output_grad(self, grad: Tensor) -> None:
        self._output_grad = grad.detach()

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = evaluate_closure(closure)
        if self._output_grad is None or len(self._inputs) != len(self._layers):
            raise RuntimeError(
                "bmp_exact: no gradient of the loss with respect to the model's output since "
                "the last step; run forward and backward on the model's output before step()"
            )
        group = self.param_groups[0]
        g = self._output_grad
        scale = -group["lr"] * (g.shape[0] if self.loss_reduction == "mean" else 1)
        inputs = [self._inputs[i] for i in range(len(self._layers))]
        found = solve(self._layers, inputs, g * scale, group["damping"], group["split"], _own)
        for i, delta_w, delta_b in found:
            w, b = _own(self._layers[i].module)  # type: ignore[arg-type]  # a Linear layer
            self._apply(group, w, delta_w)
            if b is not None and delta_b is not None:
                self._apply(group, b, delta_b)
        self._inputs.clear()
        self._output_grad = None
        return loss

    def _apply(self, group: dict[str, Any], p: Tensor, delta: Tensor) -> None:
        if not p.requires_grad:
            return
        mu = group["momentum"]
        if mu > 0.0:
            state = self.state[p]
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = delta.clone()
            else:
                buf.mul_(mu).add_(delta)
            delta = buf
        p.add_(delta)


def _read(model: nn.Module) -> tuple[list[Leaf], list[tuple[str, nn.Parameter]]]:
    """The model's chain of layers and its trainable parameters with their names."""
    layers = _chain(parse(model, "bmp_exact", _supported, _ADVICE))
    names = {id(p): n for n, p in model.named_parameters()}
    named: list[tuple[str, nn.Parameter]] = []
    for leaf in layers:
        own = list(leaf.module.parameters(recurse=False))
        if own and not isinstance(leaf.module, nn.Linear):
            raise UnsupportedModelError(
                "bmp_exact",
                f"{describe(leaf.path, leaf.module)}: only Linear layers may hold parameters",
            )
        named += [(names[id(p)], p) for p in own if p.requires_grad]
    if not named:
        raise UnsupportedModelError("bmp_exact", "the model has no trainable Linear parameters")
    return layers, named


class MemberSolver:
    """`bmp_exact` for K stacked models (a cohort, `optim.batched.BatchedBackMatchingExact`)
    built on `model`, the template whose layers the members' forward passes run through
    (`torch.func.vmap` over `functional_call`).

    The layers' hooks run inside the vmapped forward pass, so the `(input, output)` each records
    is one member's; a hook on the template hands them out (`forward_statistics`), stacked
    `[K, ...]` by vmap (`record`), and the stacked output's gradient arrives through
    `watch_output`. `changes(k, …)` then solves member k on its own slices with `solve`, the
    code that solves one model's step: a member's changes are its separate run's, to the
    rounding of the batched forward and backward passes. The solves stay per member: they are
    dense linear algebra on the member's own matrices, which a stack does not make larger."""

    def __init__(self, model: nn.Module) -> None:
        self.layers, named = _read(model)
        self.names = [name for name, _ in named]  # the trainable ones
        self._param_names = {id(p): n for n, p in model.named_parameters()}
        self._seen: dict[int, tuple[Tensor, Tensor]] = {}  # inside vmap: one member's
        self._gathered: tuple[Tensor, ...] | None = None
        self._inputs: list[tuple[Tensor, Tensor]] | None = None  # [K, ...] each
        self._grad: Tensor | None = None
        self._handles = [leaf.module.register_forward_hook(self._recorder(i))
                         for i, leaf in enumerate(self.layers)]  # fmt: skip
        self._handles.append(model.register_forward_hook(self._gather))

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _recorder(self, index: int) -> Callable[[nn.Module, tuple[Any, ...], Any], None]:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if torch.is_grad_enabled():
                self._seen[index] = (args[0].detach(), output.detach())

        return record

    def _gather(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if torch.is_grad_enabled():
            if len(self._seen) != len(self.layers):
                raise RuntimeError("bmp_exact: a layer of the chain saw no forward pass")
            self._gathered = tuple(t for i in range(len(self.layers)) for t in self._seen[i])
            self._seen.clear()

    def forward_statistics(self) -> tuple[Tensor, ...]:
        """Inside the vmapped training forward pass, after the template: this member's."""
        gathered, self._gathered = self._gathered, None
        if gathered is None:
            raise RuntimeError("bmp_exact: the template's forward pass recorded nothing")
        return gathered

    def record(self, statistics: Sequence[Tensor]) -> None:
        """`forward_statistics()` of every member, stacked (`[K, ...]` each)."""
        self._inputs = list(zip(statistics[::2], statistics[1::2], strict=True))

    def watch_output(self, output: Tensor) -> None:
        """The members' stacked output `[K, B, ...]`: its gradient is every member's target."""
        output.register_hook(self._keep)

    def _keep(self, grad: Tensor) -> None:
        self._grad = grad.detach()

    def changes(
        self, k: int, lr: float, damping: float, split: bool, params: dict[str, Tensor]
    ) -> list[tuple[str, Tensor]]:
        """Member k's `(parameter name, change)` this step, `params` the stacked parameters."""
        if self._inputs is None or self._grad is None:
            raise RuntimeError(
                "bmp_exact: no gradient of the loss with respect to the members' output since "
                "the last step; run forward and backward before step()"
            )
        names = self._param_names
        g = self._grad[k]
        inputs = [(x[k], y[k]) for x, y in self._inputs]

        def weights(layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
            bias = None if layer.bias is None else params[names[id(layer.bias)]][k]
            return params[names[id(layer.weight)]][k], bias

        found = solve(self.layers, inputs, g * (-lr * g.shape[0]), damping, split, weights)
        out: list[tuple[str, Tensor]] = []
        for i, delta_w, delta_b in found:
            layer = self.layers[i].module
            out.append((names[id(layer.weight)], delta_w))
            if delta_b is not None:
                out.append((names[id(layer.bias)], delta_b))
        trainable = set(self.names)
        return [(name, delta) for name, delta in out if name in trainable]

    def reset(self) -> None:
        """Forget this step's inputs and gradient."""
        self._inputs, self._grad = None, None


Weights = Callable[[nn.Linear], tuple[Tensor, Tensor | None]]


def _own(layer: nn.Linear) -> tuple[Tensor, Tensor | None]:
    return layer.weight, layer.bias


def solve(
    layers: Sequence[Leaf],
    inputs: Sequence[tuple[Tensor, Tensor]],
    target: Tensor,
    damping: float,
    split: bool,
    weights: Weights,
) -> list[tuple[int, Tensor, Tensor | None]]:
    """One exact step of a chain, from the top: `(layer index, ΔW, Δb)` for every Linear layer,
    given each layer's recorded `(input, output)`, the output target `Δz[L]`, and `weights`,
    which reads a layer's current `(W, b)` (a cohort member's slices in
    `optim.backmatching.exact.MemberSolver`). Every input shift uses the weights before the
    step, so the changes may be applied in any order."""
    linear = [i for i, leaf in enumerate(layers) if isinstance(leaf.module, nn.Linear)]
    lowest, below = linear[0], len(linear)  # parametrised blocks at or below layer i
    found = []
    for i in range(len(layers) - 1, lowest - 1, -1):
        module = layers[i].module
        x, y = inputs[i]
        if isinstance(module, nn.Linear):
            share = 1.0 / below if split else 1.0
            w, b = weights(module)
            delta_w, delta_b, target = _linear(w, b, x, target, damping, i > lowest, share)
            found.append((i, delta_w, delta_b))
            below -= 1
        elif isinstance(module, _PASS):
            target = target.reshape(x.shape)
        else:
            target = _activation_shift(slope(module, x, y), target, damping)
    return found


def _linear(
    w: Tensor,
    b: Tensor | None,
    x: Tensor,
    target: Tensor,
    damping: float,
    shift_input: bool,
    share: float,
) -> tuple[Tensor, Tensor | None, Tensor]:
    """`(ΔW, Δb, input shift)` of a Linear layer `(w, b)` moved toward `share × target` on its
    output; the shift produces the rest, `(1 − share) × target` (the whole target when `share`
    is 1; `target` itself when there is no input to shift)."""
    n_out, n_in = w.shape
    rows = x.reshape(-1, n_in)
    wanted = target.reshape(-1, n_out)
    if b is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    delta = _damped_solve(rows, wanted, damping, rows.shape[1])  # (n_in [+1]) × n_out
    if share != 1.0:
        delta.mul_(share)
    shift = target
    if shift_input:
        shift = _damped_solve(w, wanted.T, damping, min(n_in, n_out)).T.reshape(x.shape)
        if share != 1.0:
            shift.mul_(1.0 - share)
    return delta[:n_in].T, (delta[n_in] if b is not None else None), shift


def _damped_solve(a: Tensor, b: Tensor, damping: float, dims: int) -> Tensor:
    """`argmin_X ‖a·X − b‖² + λ‖X‖²` with `λ = damping · trace(aᵀa) / dims`.

    `damping = 0`: the minimum-norm least-squares solution `a⁺·b`.
    """
    if damping == 0.0:
        return torch.linalg.pinv(a) @ b
    gram = a.T @ a
    lam = damping * torch.trace(gram) / dims
    gram.diagonal().add_(lam)
    return torch.linalg.solve(gram, a.T @ b)


def _activation_shift(fp: Tensor, target: Tensor, damping: float) -> Tensor:
    """`Δu = f'·Δy / (f'² + λ_f)`; with no damping, units with `f' = 0` get no shift."""
    fp2 = fp.square()
    if damping == 0.0:
        return torch.where(fp != 0, target / torch.where(fp != 0, fp, 1.0), 0.0)
    return target * fp / (fp2 + damping * fp2.mean())
