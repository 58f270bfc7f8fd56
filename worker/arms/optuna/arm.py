"""The Optuna tuner's arm on a run (its spec is `worker.arms.optuna.spec`, its checks
`worker.arms.optuna.checks`).

- Run (`OptunaArmRun`): `budget.trials_per_arm` trials asked from the spec's sampler
  (`worker.arms.optuna.sampling`) and pruned by its pruner; each trial is a
  `worker.runner.TrialConfig` run in a Ray task; then the final seeds (`worker.arms.base`),
  with the test split evaluated.
- Cohorts (`resources.cohort_size`, `cohort_choice`): up to K trials asked at once run as one
  `CohortJob`, one Ray task training them as one batched model (`worker.cohort_task`); each is
  still its own Optuna trial, told its own result. K is 1 for schemes the engine refuses and for
  models `vmap` cannot batch (`worker.cohort.batching_problem`), with the reason in the sweep
  study's `cohort_note`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import optuna

import optim
from worker.arms.base import FINAL, SWEEP, ArmRun, Assignment, Job
from worker.arms.optuna.checks import (
    largest_cohort,
    model_batching_problem,
    model_key,
    probe_values,
    single_trial_reason,
)
from worker.arms.optuna.sampling import make_pruner, make_sampler, suggest
from worker.arms.optuna.spec import OptunaArmSpec
from worker.cohort import CohortError, check_cohort
from worker.cohort_task import CohortWork, MemberError
from worker.runner import TrialConfig
from worker.spec_schedule import split_params
from worker.tasks import DataRoots, get_task, redact_paths

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = ["ARM_RUN", "CohortJob", "OptunaArmRun"]


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

    @property
    def awaits_answers(self) -> bool:
        return any(m.awaits_answers for m in self.members)

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
        super().__init__(spec, index, storage, study_key)
        arm = spec.arms[index]
        assert isinstance(arm, OptunaArmSpec), "the driver runs an arm by its tuner"
        self.optuna_arm = arm
        self.space = spec.arm_search_space(arm)
        self.fixed = dict(arm.fixed)

    def sweep_sampler(self) -> optuna.samplers.BaseSampler:
        """The spec's sampler with the spec's seed: a resumed sweep proposes what an
        uninterrupted one would (`worker.arms.optuna.sampling`)."""
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
        with the engine's reason for a scheme it cannot batch, or with the reason a model does
        not run batched (`worker.cohort.batching_problem`)."""
        wanted = self.spec.resources.cohort_size
        try:
            check_cohort([self._config(FINAL, probe_values(self.optuna_arm, self.space), 0)])
        except CohortError as exc:
            return 1, exc.reason
        except (optim.HyperparameterError, optim.UnsupportedModelError):
            pass  # a combination the probe made up; the trials' own values decide
        if wanted == 1:
            return 1, None
        task = get_task(self.spec.task)
        problem = model_batching_problem(*model_key(self.spec, self.optuna_arm))
        if problem is not None:
            return 1, (
                f"the {task.model.name} model of {task.name} does not train as a batched cohort "
                f"(torch.func.vmap): {problem}; its trials run one per task"
            )
        if wanted != "auto":
            return wanted, None
        size = largest_cohort(self.spec, self.optuna_arm)
        return size, None if size > 1 else single_trial_reason(self.spec, self.optuna_arm)

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

    def _config(self, role: str, values: dict[str, Any], seed: int) -> TrialConfig:
        """A trial of `values` (hyperparameters, and swept `schedule.*` fields)."""
        spec = self.spec
        hyperparameters, schedule = split_params(values, spec.arm_schedule(self.arm))
        return TrialConfig(
            task=spec.task,
            scheme=self.scheme,
            hyperparameters=hyperparameters,
            schedule=schedule,
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


ARM_RUN = OptunaArmRun  # what the registry (`worker.arms`) reads
