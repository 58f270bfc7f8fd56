"""Optimizers for K models trained as one: stacked parameters, one set of hyperparameters each.

A *cohort* stacks the same parameter of K copies of a network into one tensor of shape
`[K, *shape]` (`torch.func.stack_module_state`); member k's gradient is slice k of the
gradient of the summed member losses. The optimizers here apply each member's own scheme with
its own hyperparameters (per-member values become `[K]` tensors broadcast over the trailing
dimensions) and reproduce the single-model optimizers slice by slice:

- `sgd`, `adam`, `adamw`: `torch.optim.SGD`, `Adam`, `AdamW` (single-tensor path, no AMSGrad,
  no dampening);
- `lars`, `lamb`: `optim.LARS`, `optim.LAMB`, trust ratios per member and per tensor;
- `bmp`: `optim.BackMatching`, factors per member from each member's own forward statistics
  (`optim.backmatching.batched`; the stack hands them over through `forward_statistics`);
- `bmp_exact`: `optim.BackMatchingExact`, each member's least-squares step solved on its own
  slices by the single optimizer's code (`optim.backmatching.exact.MemberSolver`).

Why the operations look the way they do: PyTorch computes `a.add(b, alpha=s)`,
`a.addcmul(b, c, value=s)` and `a.addcdiv(b, c, value=s)` with a fused multiply-add, so
`a + s*b` is not the same float. With a per-member `s` the same fused kernels are reached
through `torch.addcmul(a, b, s_k)` and `torch.addcdiv(a, s_k*b, c)`; scalars that the single
optimizers compute in Python (bias corrections, `1 − lr·wd`, `lr·ratio`) are computed in Python
here too, per member. A slice then matches a separate training to rounding of the norms (a
trust ratio's norm is reduced per member in one kernel, not tensor by tensor), which float64
tests bound at 1e-10.

A member whose hyperparameter switches a branch off in PyTorch (momentum 0, weight decay 0)
takes the same arithmetic with a zero, which gives the same numbers for finite values.
Discrete options (`nesterov`, `exclude_bias_and_norm`) must be equal across the cohort.

`set_lr(values)` sets each member's rate before a step (a learning-rate schedule; the single
optimizers get `lr = base · m(s)` in their parameter groups, the same product).

`select(index)` keeps the members `index` (in that order) in the parameters and every state
tensor: a member that is pruned or diverged leaves the batch, so nothing it holds can reach
the others.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from optim.backmatching.batched import MemberFactors
from optim.backmatching.exact import MemberSolver

__all__ = [
    "BATCHED_SCHEMES",
    "BatchedBackMatching",
    "BatchedBackMatchingExact",
    "BatchedOptimizer",
    "build_batched",
]


class BatchedOptimizer:
    """Base: stacked leaf parameters (`params`, name → `[K, ...]`), per-member hyperparameters
    (name → one value per member), and state tensors with a leading member dimension.

    A scheme whose step needs statistics of the forward pass (`watches_forward`) gets them in
    two halves: `forward_statistics()` is called inside the vmapped function right after each
    training forward pass and returns one member's tensors; `vmap` stacks them, and
    `record_statistics` receives them `[K, ...]` before the backward pass and the step;
    `watch_output` then receives the stacked output (to hook its gradient)."""

    layerwise = False
    needs_model = False  # built with the template module the stack's forward calls
    watches_forward = False

    def __init__(
        self,
        params: Mapping[str, Tensor],
        hyperparameters: Sequence[Mapping[str, Any]],
        member_dims: Mapping[str, int],
    ) -> None:
        self.params: dict[str, Tensor] = dict(params)
        self.members = len(hyperparameters)
        self.hp: dict[str, list[Any]] = {
            k: [h[k] for h in hyperparameters] for k in hyperparameters[0]
        }
        self.member_dims = dict(member_dims)  # a parameter's dimension in one member
        self.state: dict[str, dict[str, Tensor]] = {name: {} for name in self.params}
        self.steps = 0
        self._factors: dict[str, Tensor] = {}
        self._vectors: dict[str, Tensor] = {}  # per-member constants, rebuilt after `select`
        first = next(iter(self.params.values()))
        self._dtype, self._device = first.dtype, first.device

    def same(self, name: str) -> Any:
        """A discrete option's value, which every member must share."""
        values = set(self.hp[name])
        if len(values) != 1:
            raise ValueError(f"{name}: members differ ({sorted(values)}); a cohort shares it")
        return values.pop()

    def vector(self, values: Sequence[float]) -> Tensor:
        """Per-member floats as a `[K]` tensor in the parameters' dtype and device."""
        return torch.tensor(list(values), dtype=self._dtype, device=self._device)

    def constant(self, key: str, values: Callable[[], Sequence[float]]) -> Tensor:
        """`vector(values())`, computed once per cohort composition (hyperparameters and
        what derives from them alone), not at every step."""
        if key not in self._vectors:
            self._vectors[key] = self.vector(values())
        return self._vectors[key]

    def column(self, values: Tensor | Sequence[float], like: Tensor) -> Tensor:
        """`[K]` values shaped to broadcast over `like` (`[K, 1, ...]`)."""
        v = values if isinstance(values, Tensor) else self.vector(values)
        return v.view(-1, *([1] * (like.dim() - 1)))

    def hp_vector(self, name: str) -> Tensor:
        """Hyperparameter `name` of every member, `[K]`."""
        return self.constant(name, lambda: self.hp[name])

    def any_nonzero(self, name: str) -> bool:
        return any(v != 0 for v in self.hp[name])

    def set_lr(self, values: Sequence[float]) -> None:
        """Each member's rate for the next steps (a schedule's `base · m(s)`, `optim.schedules`):
        the per-member constants derived from it are rebuilt."""
        if len(values) != self.members:
            raise ValueError(f"lr: {len(values)} values for {self.members} members")
        self.hp["lr"] = [float(v) for v in values]
        self._vectors = {}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    def select(self, index: Sequence[int]) -> None:
        """Keep members `index`: parameters become new leaves, state and options follow."""
        idx = torch.tensor(list(index), dtype=torch.long, device=self._device)
        with torch.no_grad():
            self.params = {
                n: p.detach().index_select(0, idx).requires_grad_(p.requires_grad)
                for n, p in self.params.items()
            }
            self.state = {
                n: {k: t.index_select(0, idx) for k, t in s.items()} for n, s in self.state.items()
            }
            self._factors = {n: f.index_select(0, idx) for n, f in self._factors.items()}
        self.hp = {k: [v[i] for i in index] for k, v in self.hp.items()}
        self.members = len(index)
        self._vectors = {}

    def forward_statistics(self) -> tuple[Tensor, ...]:
        """Inside the vmapped training forward pass: this member's statistics for the step."""
        return ()

    def record_statistics(self, statistics: Sequence[Tensor]) -> None:
        """`forward_statistics()` of every member, stacked (`[K, ...]` each)."""

    def watch_output(self, output: Tensor) -> None:
        """The members' stacked output of that training pass (`[K, B, ...]`), before the loss."""

    def layer_factors(self) -> dict[str, Tensor]:
        """Per tensor, the `[K]` trust ratios of the last step (layer-wise schemes)."""
        return dict(self._factors)

    def member_norms(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """Each tensor's per-member 2-norm, `[K]`."""
        return [torch.linalg.vector_norm(t.flatten(1), dim=1) for t in tensors]

    @torch.no_grad()
    def step(self) -> None:
        raise NotImplementedError


class BatchedSGD(BatchedOptimizer):
    """`torch.optim.SGD(lr, momentum, weight_decay, nesterov)` per member."""

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        nesterov = self.same("nesterov")
        decay, use_momentum = self.any_nonzero("weight_decay"), self.any_nonzero("momentum")
        wd, momentum = self.hp_vector("weight_decay"), self.hp_vector("momentum")
        neg_lr = self.constant("-lr", lambda: [-lr for lr in self.hp["lr"]])
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if decay:
                g = torch.addcmul(g, p, self.column(wd, p))
            if use_momentum:
                m = self.column(momentum, p)
                buf = self.state[name].get("momentum_buffer")
                if buf is None:
                    buf = self.state[name]["momentum_buffer"] = g.detach().clone()
                else:
                    buf.mul_(m).add_(g)
                g = torch.addcmul(g, buf, m) if nesterov else buf
            p.addcmul_(g, self.column(neg_lr, p))


class BatchedAdam(BatchedOptimizer):
    """`torch.optim.Adam` (or `AdamW` with `decoupled`) per member."""

    decoupled = False

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        t = float(self.steps)  # torch.optim keeps the step as a float tensor
        hp = self.hp
        bc1 = [1 - b**t for b in hp["beta1"]]
        bc2_sqrt = [(1 - b**t) ** 0.5 for b in hp["beta2"]]
        neg_step = self.vector([-(lr / c) for lr, c in zip(hp["lr"], bc1, strict=True)])
        denom_scale = self.vector(bc2_sqrt)
        shrink = self.constant(
            "1-lr*wd",
            lambda: [1 - lr * wd for lr, wd in zip(hp["lr"], hp["weight_decay"], strict=True)],
        )
        wd, eps = self.hp_vector("weight_decay"), self.hp_vector("eps")
        beta2 = self.hp_vector("beta2")
        one_minus_beta1 = self.constant("1-beta1", lambda: [1 - b for b in hp["beta1"]])
        one_minus_beta2 = self.constant("1-beta2", lambda: [1 - b for b in hp["beta2"]])
        decay = self.any_nonzero("weight_decay")
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            if decay:
                if self.decoupled:
                    p.mul_(self.column(shrink, p))
                else:
                    g = torch.addcmul(g, p, self.column(wd, p))
            state = self.state[name]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, self.column(one_minus_beta1, p))
            v.mul_(self.column(beta2, p)).addcmul_(g * self.column(one_minus_beta2, p), g)
            denom = (v.sqrt() / self.column(denom_scale, p)).add_(self.column(eps, p))
            p.addcdiv_(m * self.column(neg_step, p), denom)


class BatchedAdamW(BatchedAdam):
    decoupled = True


class BatchedLARS(BatchedOptimizer):
    """`optim.LARS` per member: trust ratio η‖w‖/(‖g‖ + β‖w‖) per member and tensor."""

    layerwise = True

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        exclude = self.same("exclude_bias_and_norm")
        live = [(n, p) for n, p in self.params.items() if p.grad is not None]
        grads = [p.grad for _, p in live]
        w_norms = self.member_norms([p for _, p in live])
        g_norms = self.member_norms(grads)  # type: ignore[arg-type]
        lr, eta, wd = (self.hp_vector(k) for k in ("lr", "trust_coefficient", "weight_decay"))
        momentum = self.hp_vector("momentum")
        decay = self.any_nonzero("weight_decay")
        first = self.steps == 1
        self._factors = {}
        for (name, p), g, w_norm, g_norm in zip(live, grads, w_norms, g_norms, strict=True):
            assert g is not None
            adapted = not (exclude and self.member_dims[name] <= 1)
            if adapted:
                computed = eta * w_norm / (g_norm + wd * w_norm)
                ratio = torch.where((w_norm > 0) & (g_norm > 0), computed, 1.0)
                d = torch.addcmul(g, p, self.column(wd, p)) if decay else g
            else:
                ratio, d = torch.ones_like(w_norm), g
            self._factors[name] = ratio
            rate = self.column(lr * ratio, p)
            state = self.state[name]
            if first or "momentum_buffer" not in state:
                state["momentum_buffer"] = d * rate
            else:
                buf = state["momentum_buffer"]
                buf.mul_(self.column(momentum, p)).addcmul_(d, rate)
            p.sub_(state["momentum_buffer"])


class BatchedLAMB(BatchedOptimizer):
    """`optim.LAMB` per member: Adam direction scaled by ‖w‖/‖r‖ per member and tensor."""

    layerwise = True

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        t = self.steps
        exclude = self.same("exclude_bias_and_norm")
        hp = self.hp
        bc1 = self.vector([1.0 - b**t for b in hp["beta1"]])
        bc2 = self.vector([1.0 - b**t for b in hp["beta2"]])
        beta1, beta2 = self.hp_vector("beta1"), self.hp_vector("beta2")
        one_minus_beta1 = self.constant("1-beta1", lambda: [1.0 - b for b in hp["beta1"]])
        one_minus_beta2 = self.constant("1-beta2", lambda: [1.0 - b for b in hp["beta2"]])
        wd, eps = self.hp_vector("weight_decay"), self.hp_vector("eps")
        decay = self.any_nonzero("weight_decay")
        names, params, updates, adapt = [], [], [], []
        for name, p in self.params.items():
            g = p.grad
            if g is None:
                continue
            state = self.state[name]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(self.column(beta1, p)).addcmul_(g, self.column(one_minus_beta1, p))
            v.mul_(self.column(beta2, p)).addcmul_(g * self.column(one_minus_beta2, p), g)
            denom = v.div(self.column(bc2, p)).sqrt_().add_(self.column(eps, p))
            r = m.div(self.column(bc1, p)).div_(denom)
            adapted = not (exclude and self.member_dims[name] <= 1)
            if adapted and decay:
                r = torch.addcmul(r, p, self.column(wd, p))
            names.append(name)
            params.append(p)
            updates.append(r)
            adapt.append(adapted)
        w_norms, r_norms = self.member_norms(params), self.member_norms(updates)
        neg_lr = -self.hp_vector("lr")
        self._factors = {}
        for name, p, r, w_norm, r_norm, adapted in zip(
            names, params, updates, w_norms, r_norms, adapt, strict=True
        ):
            if adapted:
                ratio = torch.where((w_norm > 0) & (r_norm > 0), w_norm / r_norm, 1.0)
            else:
                ratio = torch.ones_like(w_norm)
            self._factors[name] = ratio
            p.addcmul_(r, self.column(neg_lr * ratio, p))


class BatchedBackMatching(BatchedOptimizer):
    """`optim.BackMatching` per member: factors from each member's own forward statistics
    (`optim.backmatching.batched.MemberFactors`), then `BackMatching._update` (SGD on `f·g`,
    the momentum kept as `c = b/f`) with every per-member number a `[K]` column.

    The coefficients (`−lr·f`, `μ·f_prev/f`, `wd/f`, `−lr·μ·f`, `1 − lr·wd`) are computed in
    float64 in the order Python computes them for one model. `propagate`,
    `mean_over_positions` and `nesterov` are shared; when every member's momentum is 0 the
    update is the single optimizer's momentum-free form, otherwise every member takes the
    momentum form, which for momentum 0 gives the same numbers (with weight decay, to an ulp).
    """

    layerwise = True
    needs_model = True
    watches_forward = True

    def __init__(
        self,
        params: Mapping[str, Tensor],
        hyperparameters: Sequence[Mapping[str, Any]],
        member_dims: Mapping[str, int],
        model: nn.Module,
    ) -> None:
        super().__init__(params, hyperparameters, member_dims)
        propagate, mean = self.same("propagate"), self.same("mean_over_positions")
        self.member_factors = MemberFactors(model, hyperparameters, propagate, mean)
        self._nesterov = self.same("nesterov")
        missing = [n for n in self.member_factors.names if n not in self.params]
        if missing:
            raise ValueError(f"bmp: the stacked parameters lack {', '.join(missing)}")

    def forward_statistics(self) -> tuple[Tensor, ...]:
        return self.member_factors.forward_statistics()

    def record_statistics(self, statistics: Sequence[Tensor]) -> None:
        self.member_factors.record(statistics)

    def select(self, index: Sequence[int]) -> None:
        super().select(index)
        self.member_factors.select(index)

    def _f64(self, name: str) -> Tensor:
        """Hyperparameter `name` of every member, float64 `[K]` (for the coefficients)."""
        key = f"f64:{name}"
        if key not in self._vectors:
            self._vectors[key] = torch.tensor(
                self.hp[name], dtype=torch.float64, device=self._device
            )
        return self._vectors[key]

    @torch.no_grad()
    def step(self) -> None:
        f = self.member_factors.factors(self.steps + 1)  # [P, K], float64
        self.steps += 1
        names = self.member_factors.names
        self._factors = dict(zip(names, f, strict=True))
        lr, wd, mu = (self._f64(k) for k in ("lr", "weight_decay", "momentum"))
        dtype, hp = self._dtype, self.hp
        lr_f = (-lr * f).to(dtype)
        decay = self.any_nonzero("weight_decay")
        shrink = self.constant(
            "1-lr*wd",
            lambda: [1.0 - a * b for a, b in zip(hp["lr"], hp["weight_decay"], strict=True)],
        )
        if not self.any_nonzero("momentum"):
            for name, coefficient in zip(names, lr_f, strict=True):
                p = self.params[name]
                if p.grad is not None:
                    if decay:
                        p.mul_(self.column(shrink, p))
                    p.addcmul_(p.grad, self.column(coefficient, p))
            return
        wd_f = (wd / f).to(dtype) if decay else None
        lr_mu_f = (-lr * mu * f).to(dtype) if self._nesterov else None
        for j, name in enumerate(names):
            p = self.params[name]
            g = p.grad
            if g is None:
                continue
            state = self.state[name]
            c = state.get("scaled_momentum")
            if c is None:
                c = g.clone()
            else:  # b = μ·b_prev + f·g, divided by f
                ratio = (mu * state["momentum_factor"] / f[j]).to(dtype)
                c = torch.addcmul(g, c, self.column(ratio, p))
            state["scaled_momentum"], state["momentum_factor"] = c, f[j]
            if wd_f is not None:
                c.addcmul_(p, self.column(wd_f[j], p))
            if lr_mu_f is not None:  # w − lr·(f·g + wd·w + μ·b)
                if decay:
                    p.mul_(self.column(shrink, p))
                p.addcmul_(g, self.column(lr_f[j], p)).addcmul_(c, self.column(lr_mu_f[j], p))
            else:
                p.addcmul_(c, self.column(lr_f[j], p))


class BatchedBackMatchingExact(BatchedOptimizer):
    """`optim.BackMatchingExact` per member: the layers' inputs and outputs recorded per member
    under vmap, each member's changes solved on its own slices (`MemberSolver`), then its
    heavy-ball momentum (`v ← μ·v + Δθ`, `θ ← θ + v`) on its slice. `split` is shared."""

    needs_model = True
    watches_forward = True

    def __init__(
        self,
        params: Mapping[str, Tensor],
        hyperparameters: Sequence[Mapping[str, Any]],
        member_dims: Mapping[str, int],
        model: nn.Module,
    ) -> None:
        super().__init__(params, hyperparameters, member_dims)
        self.solver = MemberSolver(model)
        self._split = self.same("split")
        missing = [n for n in self.solver.names if n not in self.params]
        if missing:
            raise ValueError(f"bmp_exact: the stacked parameters lack {', '.join(missing)}")

    def forward_statistics(self) -> tuple[Tensor, ...]:
        return self.solver.forward_statistics()

    def record_statistics(self, statistics: Sequence[Tensor]) -> None:
        self.solver.record(statistics)

    def watch_output(self, output: Tensor) -> None:
        self.solver.watch_output(output)

    @torch.no_grad()
    def step(self) -> None:
        self.steps += 1
        hp = self.hp
        for k in range(self.members):
            mu = hp["momentum"][k]
            changes = self.solver.changes(
                k, hp["lr"][k], hp["damping"][k], self._split, self.params
            )
            for name, delta in changes:
                if mu > 0.0:
                    state = self.state[name]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = torch.zeros_like(self.params[name])
                    buf = state["momentum_buffer"][k]
                    if self.steps == 1:
                        buf.copy_(delta)
                    else:
                        buf.mul_(mu).add_(delta)
                    delta = buf
                self.params[name][k].add_(delta)
        self.solver.reset()


BATCHED_SCHEMES: dict[str, type[BatchedOptimizer]] = {
    "sgd": BatchedSGD,
    "adam": BatchedAdam,
    "adamw": BatchedAdamW,
    "lars": BatchedLARS,
    "lamb": BatchedLAMB,
    "bmp": BatchedBackMatching,
    "bmp_exact": BatchedBackMatchingExact,
}


def build_batched(
    scheme: str,
    params: Mapping[str, Tensor],
    hyperparameters: Sequence[Mapping[str, Any]],
    member_dims: Mapping[str, int],
    model: nn.Module | None = None,
) -> BatchedOptimizer:
    """The batched optimizer of `scheme` over stacked `params`, one validated hyperparameter
    dict per member (`optim.validate` fills defaults); a KeyError for schemes without one.
    `model`: the template module the members' forward passes run through (`functional_call`),
    which `needs_model` schemes hook."""
    kind = BATCHED_SCHEMES[scheme]
    if not kind.needs_model:
        return kind(params, hyperparameters, member_dims)
    if model is None:
        raise ValueError(f"{scheme}: the batched optimizer needs the template model")
    return kind(params, hyperparameters, member_dims, model)  # type: ignore[call-arg]
