"""The Optuna tuner (`tuner: "optuna"`, the default): a sweep of the arm's search space.

- Spec: the arm's `fixed` hyperparameters and its `search_space` (the study's, with the arm's
  entries replacing), checked against its scheme's registered hyperparameters (`check_arm`),
  and the scheme built on the task's model on the meta device (`check_build`), so that a spec
  that every trial would refuse is refused at submission.
- Run (`OptunaArmRun`): `budget.trials_per_arm` trials asked from the spec's sampler
  (`worker.arms.sampling`) and pruned by its pruner; each trial is a `worker.runner.TrialConfig`
  run in a Ray task; then the final seeds (`worker.arms.base`), with the test split evaluated.
- Cohorts (`resources.cohort_size`, `cohort_choice`): up to K trials asked at once run as one
  `CohortJob`, one Ray task training them as one batched model (`worker.cohort_task`); each is
  still its own Optuna trial, told its own result. K is 1 for schemes the engine refuses.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import optuna

import optim
from worker.arms.base import FINAL, SWEEP, ArmRun, Assignment, Job
from worker.arms.sampling import make_pruner, make_sampler, suggest
from worker.cohort import CohortError, auto_cohort_size, check_cohort
from worker.cohort_task import CohortWork, MemberError
from worker.runner import TrialConfig
from worker.spec import OptunaArmSpec
from worker.spec_base import Problem
from worker.tasks import DataRoots, get_task, redact_paths
from worker.tasks.models import build_model

if TYPE_CHECKING:
    from worker.spec import SearchDimension, StudySpec

__all__ = ["CohortJob", "OptunaArmRun", "check_arm", "check_build"]


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
    net = _meta_model(model, input_shape, n_classes, options)
    with _meta_device():
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


def _meta_device() -> Any:
    import torch

    return torch.device("meta")


def _meta_model(
    model: str, input_shape: tuple[int, ...], n_classes: int, options: tuple[Any, ...]
) -> Any:
    """The model a trial builds (same shape and sizes), on the meta device: nothing allocated."""
    width, depth, activation, transformed = options
    with _meta_device():
        return build_model(
            model,
            input_shape,
            n_classes,
            width=width,
            depth=depth,
            activation=activation,
            transformed=transformed,
        )


@functools.lru_cache(maxsize=64)
def _model_parameters(
    model: str, input_shape: tuple[int, ...], n_classes: int, options: tuple[Any, ...]
) -> int:
    """The parameter count of the model a trial builds (made on the meta device)."""
    net = _meta_model(model, input_shape, n_classes, options)
    return sum(p.numel() for p in net.parameters())


def _n_parameters(spec: StudySpec, arm: OptunaArmSpec) -> int:
    task, options = get_task(spec.task), spec.arm_model(arm)
    data = spec.data.model_dump()
    return _model_parameters(
        task.model.name,
        tuple(task.input_shape(data)),
        task.n_classes(data),
        (options.width, options.depth, options.activation, options.transformed),
    )


# -- the run -----------------------------------------------------------------------------------


@dataclass
class CohortJob(Job):
    """Trials of one arm and role trained together in one Ray task (`worker.cohort_task`).

    It takes one slot; the task announces its start under the job's key (every member records
    it) and each member reports under its own trial key (`routes`), so the pruner answers each
    trial. Its result is one entry per member, told as that trial's own result; a failure of the
    task (its process died, it timed out, it was interrupted, an error of the whole cohort) is
    each member's failure, retried per member as any trial's.
    """

    members: list[Assignment]
    started: float = field(default_factory=time.monotonic)
    num_gpus: float | None = None
    config: CohortWork = field(init=False)
    attempt: int = field(init=False)

    def __post_init__(self) -> None:
        self.config = CohortWork(
            [cast(TrialConfig, m.config) for m in self.members], [m.key for m in self.members]
        )
        self.attempt = max(m.attempt for m in self.members)

    @property
    def key(self) -> str:
        first = self.members[0]
        return f"{first.arm.label}/{first.role}/cohort/{first.trial.number}"

    def routes(self) -> dict[str, Job]:
        return {self.key: self, **{m.key: m for m in self.members}}

    @property
    def trials(self) -> int:
        return len(self.members)

    def record_start(
        self, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None:
        for m in self.members:
            m.record_start(pid, host, at, node)

    def record_report(self, index: int, payload: Any) -> bool:
        return False  # members report under their own keys

    def record_result(self, result: Any) -> None:
        for m, r in zip(self.members, result, strict=True):
            if isinstance(r, MemberError):
                m.record_failure(redact_paths(r.error, DataRoots.from_env()), retry=r.retry)
            else:
                m.record_result(r)

    def record_failure(self, error: str, *, interrupted: bool = False, retry: bool = True) -> None:
        for m in self.members:
            m.record_failure(error, interrupted=interrupted, retry=retry)


class OptunaArmRun(ArmRun):
    """An arm whose sweep trials are asked from the spec's sampler, one trial per Ray task, or a
    cohort of them per task (`cohort_size` > 1)."""

    def __init__(self, spec: StudySpec, index: int, storage: Any, study_key: str) -> None:
        arm = spec.arms[index]
        assert isinstance(arm, OptunaArmSpec), "the driver runs an arm by its tuner"
        self.optuna_arm = arm
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

    def cohort_choice(self) -> tuple[int, str | None]:
        """`resources.cohort_size`, or `auto_cohort_size` of the arm's model on its device; 1
        with the engine's reason for a scheme it cannot batch (bmp, bmp_exact)."""
        wanted = self.spec.resources.cohort_size
        try:
            check_cohort([self._config(FINAL, _probe_values(self.optuna_arm, self.space), 0)])
        except CohortError as exc:
            return 1, exc.reason
        except (optim.HyperparameterError, optim.UnsupportedModelError):
            pass  # a combination the probe made up; the trials' own values decide
        if wanted != "auto":
            return wanted, None
        res = self.spec.resources
        device = (
            "cuda"
            if res.device == "cuda" or (res.device == "auto" and res.gpus_per_trial)
            else "cpu"
        )
        size = auto_cohort_size(_n_parameters(self.spec, self.optuna_arm), device)
        return size, None if size > 1 else "auto: the model is too large to gain from batching"

    def _cohort_limit(self, per_arm: int) -> int:
        """How many trials one job takes: the cohort size, but no more than spreads the study's
        trials over its slots (`max_concurrent_trials`), so batching never leaves slots idle."""
        slots = self.spec.resources.max_concurrent_trials
        spread = -(-len(self.spec.arms) * per_arm // slots)
        return max(1, min(self.cohort_size, spread))

    def next_sweep_job(self) -> Job | None:
        c = self.counts[SWEEP]

        def more() -> bool:
            return c.waiting > 0 or c.originals < self.spec.budget.trials_per_arm

        if not more():
            return None
        return self._ask_cohort(SWEEP, self.sweep, more, self.spec.budget.trials_per_arm)

    def ask_final(self, study: optuna.Study) -> Job:
        c = self.counts[FINAL]
        return self._ask_cohort(FINAL, study, lambda: c.waiting > 0, self.spec.budget.final_seeds)

    def _ask_cohort(
        self, role: str, study: optuna.Study, more: Callable[[], bool], per_arm: int
    ) -> Job:
        """One trial (`Assignment`), or up to the cohort limit of them as one `CohortJob`."""
        members = [self._ask(role, study)]
        limit = self._cohort_limit(per_arm)
        while len(members) < limit and more():
            members.append(self._ask(role, study))
        if len(members) == 1:
            return members[0]
        job = CohortJob(members)
        for m in members:
            m.trial.set_user_attr("cohort", {"key": job.key, "size": len(members)})
        return job

    def _config(self, role: str, hyperparameters: dict[str, Any], seed: int) -> TrialConfig:
        spec = self.spec
        return TrialConfig(
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

    def _ask(self, role: str, study: optuna.Study) -> Assignment:
        popped = self.counts[role].waiting > 0  # Optuna hands out enqueued trials first
        trial = study.ask()
        params = suggest(trial, self.space, self.scheme)
        hyperparameters = {**self.fixed, **params}
        lr = hyperparameters.get("lr", optim.SCHEMES[self.scheme].hyperparameter("lr").default)
        seed = int(trial.user_attrs.get("seed", self.spec.seed))
        attrs = {
            "arm": self.label,
            "scheme": self.scheme,
            "role": role,
            "lr": lr,
            "seed": seed,
            "attempt": int(trial.user_attrs.get("attempt", 1)),
            "fixed": dict(self.fixed) or None,
        }
        config = self._config(role, hyperparameters, seed)
        return self.assign(role, trial, config, params, attrs, popped=popped)
