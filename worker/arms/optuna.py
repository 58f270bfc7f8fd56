"""The Optuna tuner (`tuner: "optuna"`, the default): a sweep of the arm's search space.

- Spec: the arm's `fixed` hyperparameters and its `search_space` (the study's, with the arm's
  entries replacing), checked against its scheme's registered hyperparameters (`check_arm`),
  and the scheme built on the task's model on the meta device (`check_build`), so that a spec
  that every trial would refuse is refused at submission.
- Run (`OptunaArmRun`): `budget.trials_per_arm` trials asked from the spec's sampler
  (`worker.arms.sampling`) and pruned by its pruner; each trial is a `worker.runner.TrialConfig`
  run in a Ray task; then the final seeds (`worker.arms.base`), with the test split evaluated.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import optuna

import optim
from worker.arms.base import FINAL, SWEEP, ArmRun, Assignment, Job
from worker.arms.sampling import make_pruner, make_sampler, suggest
from worker.runner import TrialConfig
from worker.spec import OptunaArmSpec
from worker.spec_base import Problem
from worker.tasks import get_task
from worker.tasks.models import build_model

if TYPE_CHECKING:
    from worker.spec import SearchDimension, StudySpec

__all__ = ["OptunaArmRun", "check_arm", "check_build"]


# -- the spec ----------------------------------------------------------------------------------


def _check_value(scheme: str, name: str, value: Any) -> str | None:
    """The rule `value` breaks, without the scheme and the name: the field path says them."""
    try:
        optim.SCHEMES[scheme].hyperparameter(name).check(scheme, value)
    except optim.HyperparameterError as exc:
        return exc.detail
    return None


def _known(scheme: str) -> str:
    return ", ".join(h.name for h in optim.SCHEMES[scheme].hyperparameters)


def _check_dimension(scheme: str, name: str, dim: SearchDimension) -> str | None:
    hp = optim.SCHEMES[scheme].hyperparameter(name)
    if dim.values is not None:
        for value in dim.values:
            problem = _check_value(scheme, name, value)
            if problem:
                return f"value {value!r}: {problem}"
        return None
    if hp.type == "bool":
        return f"{name} of {scheme} is true/false; search it with values: [true, false]"
    for bound in (dim.low, dim.high):
        if hp.type == "int" and bound is not None and bound != int(bound):
            return f"{name} of {scheme} is an integer; bounds must be whole, got {bound:g}"
        problem = _check_value(scheme, name, bound)
        if problem:
            return f"{problem} (valid range of {name} for {scheme}: {hp.low:g} to {hp.high:g})"
    return None


def check_arm(spec: StudySpec, index: int, arm: OptunaArmSpec) -> list[Problem]:
    """An optuna arm's fixed values and search space against its scheme's hyperparameters."""
    where: tuple[str | int, ...] = ("arms", index)
    problems: list[Problem] = []
    scheme = arm.optimizer
    hyperparameters = {h.name for h in optim.SCHEMES[scheme].hyperparameters}
    for name, value in arm.fixed.items():
        if name not in hyperparameters:
            message = f"{scheme} has no hyperparameter {name!r}; known: {_known(scheme)}"
            problems.append(((*where, "fixed", name), message, value))
        elif (problem := _check_value(scheme, name, value)) is not None:
            problems.append(((*where, "fixed", name), problem, value))
    space = spec.arm_search_space(arm)
    if not space:
        problems.append(((*where, "search_space"), "nothing to search; give a search_space", None))
    own = arm.search_space or {}
    for name, dim in space.items():
        loc = (*where, "search_space", name) if name in own else ("search_space", name)
        if name not in hyperparameters:
            message = (
                f"{name!r} is not a hyperparameter of {scheme} (arm {index}); "
                f"known: {_known(scheme)}"
            )
            problems.append((loc, message, None))
        elif name in arm.fixed:
            message = f"{name!r} is both fixed and searched; keep one"
            problems.append(((*where, "fixed", name), message, arm.fixed[name]))
        elif (problem := _check_dimension(scheme, name, dim)) is not None:
            problems.append((loc, problem, None))
    return problems


@functools.lru_cache(maxsize=512)
def _build_error(
    scheme: str,
    hyperparameters: tuple[tuple[str, Any], ...],
    model: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    options: tuple[int | None, int | None, str, bool],
) -> str | None:
    """Why `optim.build` refuses this scheme on this model, or None. The model is the one a
    trial builds (same shape and sizes), made on the meta device: nothing is allocated."""
    import torch

    width, depth, activation, transformed = options
    with torch.device("meta"):
        net = build_model(
            model,
            input_shape,
            n_classes,
            width=width,
            depth=depth,
            activation=activation,
            transformed=transformed,
        )
        try:
            optim.build(scheme, net, **dict(hyperparameters))
        except optim.HyperparameterError as exc:
            return f"{exc.name}: {exc.detail}" if exc.name else exc.detail
        except optim.UnsupportedModelError as exc:
            return exc.detail
    return None


def _probe_values(arm: OptunaArmSpec, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The arm's fixed values, and each searched hyperparameter at its top (a range's high,
    a list's last value), where a combination like nesterov without momentum shows."""
    values: dict[str, Any] = dict(arm.fixed)
    for name, dim in space.items():
        if name not in values:
            values[name] = dim.values[-1] if dim.values is not None else dim.high
    return values


def check_build(spec: StudySpec, index: int, arm: OptunaArmSpec) -> Problem | None:
    """An arm whose scheme cannot be built on the task's model (bmp_exact on a convolutional
    or residual network), or not with its fixed values: refused now rather than failing every
    trial. Run once the arms and the models are otherwise valid."""
    task, options = get_task(spec.task), spec.arm_model(arm)
    data = spec.data.model_dump()
    model = (
        task.model.name,
        task.input_shape(data),
        task.n_classes(data),
        (options.width, options.depth, options.activation, options.transformed),
    )
    reason = _build_error(arm.optimizer, (), *model)
    if reason is not None:
        kind = f"transformed {task.model.name}" if options.transformed else task.model.name
        message = f"{arm.optimizer} cannot train the {kind} of {spec.task}: {reason}"
        return (("arms", index, "optimizer"), message, arm.optimizer)
    values = _probe_values(arm, spec.arm_search_space(arm))
    reason = _build_error(arm.optimizer, tuple(sorted(values.items())), *model)
    if reason is not None:
        return (("arms", index, "fixed" if arm.fixed else "search_space"), reason, None)
    return None


# -- the run -----------------------------------------------------------------------------------


class OptunaArmRun(ArmRun):
    """An arm whose sweep trials are asked from the spec's sampler, one trial per Ray task."""

    def __init__(self, spec: StudySpec, index: int, storage: Any, study_key: str) -> None:
        arm = spec.arms[index]
        assert isinstance(arm, OptunaArmSpec), "the driver runs an arm by its tuner"
        self.space = spec.arm_search_space(arm)
        self.fixed = dict(arm.fixed)
        super().__init__(spec, index, storage, study_key)

    def sweep_sampler(self) -> optuna.samplers.BaseSampler:
        """The spec's sampler with the spec's seed: a resumed sweep proposes what an
        uninterrupted one would (`worker.arms.sampling`)."""
        return make_sampler(self.spec, self.space, self.scheme, self.spec.seed)

    def sweep_pruner(self) -> optuna.pruners.BasePruner:
        return make_pruner(self.spec)

    def recover_sweep(self) -> None:
        self.recover_trials(SWEEP, self.sweep)

    @property
    def sweep_done(self) -> bool:
        c = self.counts[SWEEP]
        return c.originals >= self.spec.budget.trials_per_arm and c.waiting == 0 and c.running == 0

    def next_sweep_job(self) -> Job | None:
        c = self.counts[SWEEP]
        if c.waiting > 0 or c.originals < self.spec.budget.trials_per_arm:
            return self._ask(SWEEP, self.sweep)
        return None

    def ask_final(self, study: optuna.Study) -> Assignment:
        return self._ask(FINAL, study)

    def _ask(self, role: str, study: optuna.Study) -> Assignment:
        c = self.counts[role]
        popped = c.waiting > 0  # Optuna hands out enqueued (waiting) trials first
        trial = study.ask()
        attrs = trial.user_attrs
        params = suggest(trial, self.space, self.scheme)
        hyperparameters = {**self.fixed, **params}
        lr = hyperparameters.get("lr", optim.SCHEMES[self.scheme].hyperparameter("lr").default)
        seed = int(attrs.get("seed", self.spec.seed))
        attempt = int(attrs.get("attempt", 1))
        for key, value in {
            "arm": self.label,
            "scheme": self.scheme,
            "role": role,
            "lr": lr,
            "seed": seed,
            "attempt": attempt,
        }.items():
            trial.set_user_attr(key, value)
        if self.fixed:
            trial.set_user_attr("fixed", dict(self.fixed))
        spec = self.spec
        config = TrialConfig(
            task=spec.task,
            scheme=self.scheme,
            hyperparameters=hyperparameters,
            epochs=spec.budget.epochs,
            data=spec.data,
            model=spec.arm_model(self.arm),
            steps_per_epoch=spec.budget.steps_per_epoch,
            seed=seed,
            device=spec.resources.device,
            objective=spec.objective.metric,
            divergence_factor=spec.objective.divergence_factor,
            evaluate_test=role == FINAL,
        )
        c.start(popped)
        return Assignment(
            arm=self,
            role=role,
            trial=trial,
            config=config,
            params=params,
            attempt=attempt,
            seed=seed,
        )
