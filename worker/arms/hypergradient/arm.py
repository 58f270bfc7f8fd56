"""A hypergradient arm (`tuner: "hypergradient"`) and its two Optuna studies: the driver's side.

Its spec options and checks are `worker.arms.hypergradient`; what runs in its Ray tasks is
`worker.arms.hypergradient.jobs`.

The sweep study `<study key>/<label>` gets one COMPLETE trial per meta-iteration of
`optim.hypergrad.tune`, added by the driver as the tuning reports it (`optuna.trial.
create_trial`: no sampler proposes anything). A meta-iteration trial records:
- value: the validation loss the tuner minimised, or for a diverged meta-iteration the
  metric's worst value (`worker.runner.diverged_value`) with user attribute
  `outcome = "diverged"`, as diverged trials of the optuna tuner;
- params: `lr` (a `FloatDistribution`, for optuna-dashboard), also a user attribute: the
  torch.optim.SGD-equivalent rate, geometric mean of α·(1 − γ) over blocks and tensors;
- user attributes: `arm`, `scheme`, `role`, `tuner`, `lr`, `seed`, `attempt`, `outcome`,
  `meta_iteration`, `val_loss`, `schedule` (flat: `lr/b00/layer1.weight` … as
  `MetaIteration.params()`), `grad_norms`, `history` (one record: the run's end), `steps`,
  `wall_time`, `n_parameters`, `device`, and `pid`, `host`, `started_at` of the tuning task.

How it runs (`worker.sweep` drives it like any arm, through `worker.arms.base`):
- One Ray task calls the tuner once for the whole sweep (`TuneJob`, `TuneConfig`): the tuner's
  Adam state lives in that call, so its meta-iterations cannot be spread over trials. It takes
  one trial slot and `resources.cpus_per_trial`, but no GPU: the reversible trainer is numpy.
  Each meta-iteration is a report of the task, stored before the task goes on, so a stop
  loses at most the meta-iteration in progress; `resources.trial_timeout_s` bounds each
  meta-iteration (the clock restarts at every report). `should_stop()` cancels the task like
  any trial.
- Budget: `budget.trials_per_arm` meta-iterations, counted from the meta-iteration trials in
  storage. A tuning run that fails or is stopped is a FAIL trial (`outcome = "failed"`,
  `error`, `attempt`, `interrupted` when stopped): visible, but no meta-iteration. Failed runs
  are rerun while there are at most `resources.max_retries` of them (stopped runs do not
  count); after that the sweep ends with the meta-iterations it has.
- Resume (after a stop, a failure or a dead driver): the next run starts the tuner from the
  beginning and reports only the meta-iterations storage lacks. The tuner is deterministic
  (fixed seed and batches, exact arithmetic; bit for bit on the same machine and thread
  count), so the study ends as one uninterrupted run would have left it and the budget is
  never counted twice; the price is recomputing the stored meta-iterations.
- Final seeds (`<study key>/<label>/final`), as for every arm: one trial per seed with the best
  meta-iteration's schedule, retrained from scratch on that seed (`ScheduleConfig`), with
  validation and test metrics and a per-block `history`; retried like any trial.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from worker.arms.base import FINAL, SWEEP, ArmRun, Assignment, Counts, Job, best_trial
from worker.arms.hypergradient.jobs import ScheduleConfig, TuneConfig, TuneSummary
from worker.arms.hypergradient.spec import HypergradientArmSpec

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = ["HypergradArmRun", "TuneJob"]

LR_DISTRIBUTION = FloatDistribution(1e-12, 1e6, log=True)


@dataclass
class TuneJob(Job):
    """An arm's tuning run: one Ray task calling `optim.hypergrad.tune` once."""

    arm: HypergradArmRun
    config: TuneConfig
    attempt: int
    run: int  # tuning runs this driver started for the arm (makes the key unique)
    started: float = field(default_factory=time.monotonic)
    num_gpus: float | None = 0.0
    where: dict[str, Any] = field(default_factory=dict)  # pid, host, started_at, node

    @property
    def key(self) -> str:
        return f"{self.arm.label}/{SWEEP}/tune-{self.run}"

    def record_start(
        self, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None:
        self.where = {"pid": pid, "host": host, "started_at": at}
        if node is not None:
            self.where["node"] = node

    def record_report(self, index: int, payload: Any) -> bool:
        """A meta-iteration's record (`TuneConfig.run`); True stops the tuning."""
        return self.arm.record_meta(self, index, payload)

    def record_result(self, result: TuneSummary) -> None:
        self.arm.record_tuned(self, result)

    def record_failure(self, error: str, *, interrupted: bool = False, retry: bool = True) -> None:
        self.arm.record_tune_failure(self, error, interrupted=interrupted)


class HypergradArmRun(ArmRun):
    """The sweep is one tuning run's meta-iterations; the final seeds retrain the best one's
    schedule (`ScheduleConfig`)."""

    def __init__(self, spec: StudySpec, index: int, storage: Any, study_key: str) -> None:
        super().__init__(spec, index, storage, study_key)
        arm = spec.arms[index]
        assert isinstance(arm, HypergradientArmSpec), "the driver runs an arm by its tuner"
        self.options = arm.hypergradient_options
        steps = arm.run_steps(spec.budget)
        assert steps is not None, "validated by the spec"
        self.steps = steps
        self.batch_size = self.options.batch_size or spec.data.batch_size
        self.tuning: TuneJob | None = None
        self.recorded: set[int] = set()  # meta-iteration indices in storage
        self.failed_runs = 0  # failed tuning runs, stopped ones excluded
        self.gave_up = False
        self._runs = 0

    def open_studies(self) -> None:
        super().open_studies()
        self.study_id = self.storage.get_study_id_from_name(self.sweep.study_name)
        if "hypergradient" not in self.sweep.user_attrs:  # what the trials were tuned with
            resolved = {"steps": self.steps, "batch_size": self.batch_size}
            self.sweep.set_user_attr("hypergradient", {**self.options.model_dump(), **resolved})

    def sweep_sampler(self) -> optuna.samplers.BaseSampler:
        return optuna.samplers.RandomSampler(seed=self.spec.seed)  # never asked: trials are added

    def _attrs(self, role: str) -> dict[str, Any]:
        return {"arm": self.label, "scheme": self.scheme, "role": role, "tuner": self.arm.tuner}

    # -- counting ------------------------------------------------------------------------------

    def recover_sweep(self) -> None:
        self._recount_sweep()

    def _recount_sweep(self) -> None:
        """The meta-iterations and failed tuning runs in storage."""
        trials = self.sweep.get_trials(deepcopy=False)
        metas = [
            t for t in trials if t.state == TrialState.COMPLETE and "meta_iteration" in t.user_attrs
        ]
        runs = [t for t in trials if t.state == TrialState.FAIL]
        self.recorded = {int(t.user_attrs["meta_iteration"]) for t in metas}
        self.failed_runs = sum(not t.user_attrs.get("interrupted") for t in runs)
        budget = self.spec.budget.trials_per_arm
        missing = max(0, budget - len(self.recorded))
        self.gave_up = missing > 0 and self.failed_runs > self.spec.resources.max_retries
        c = Counts(originals=len(self.recorded), failed=len(runs))
        c.diverged = sum(t.user_attrs.get("outcome") == "diverged" for t in metas)
        c.complete = len(metas) - c.diverged
        c.running = int(self.tuning is not None)
        c.exhausted = missing if self.gave_up else 0  # so that progress reaches its total
        self.counts[SWEEP] = c
        self.best = best_trial(trials, self.spec.objective.maximize)

    @property
    def sweep_done(self) -> bool:
        budget = self.spec.budget.trials_per_arm
        return self.tuning is None and (len(self.recorded) >= budget or self.gave_up)

    # -- the tuning run ------------------------------------------------------------------------

    def next_sweep_job(self) -> Job | None:
        return self._tune_job() if self.tuning is None else None

    def _tune_job(self) -> TuneJob:
        spec, options = self.spec, self.options
        config = TuneConfig(
            task=spec.task,
            data=spec.data,
            model=spec.arm_model(self.arm),
            steps=self.steps,
            blocks=options.blocks,
            batch_size=self.batch_size,
            meta_iterations=spec.budget.trials_per_arm,
            meta_lr=options.meta_lr,
            learn=tuple(options.learn),
            lr=options.lr,
            momentum=options.momentum,
            init_scale=options.init_scale,
            l2=options.l2,
            seed=spec.seed,
            skip=len(self.recorded),
            divergence_factor=spec.objective.divergence_factor,
        )
        self._runs += 1
        self.tuning = TuneJob(arm=self, config=config, attempt=self.failed_runs + 1, run=self._runs)
        self.counts[SWEEP].running += 1
        return self.tuning

    def _add(self, trial: optuna.trial.FrozenTrial) -> optuna.trial.FrozenTrial:
        """Store a finished trial in the sweep study; the stored copy has its number."""
        trial_id = self.storage.create_new_trial(self.study_id, template_trial=trial)
        stored: optuna.trial.FrozenTrial = self.storage.get_trial(trial_id)
        return stored

    def record_meta(self, job: TuneJob, index: int, record: dict[str, Any]) -> bool:
        """Store a meta-iteration as a trial; True (stop) once the budget is full."""
        if index in self.recorded:
            return False
        if len(self.recorded) >= self.spec.budget.trials_per_arm:
            return True
        job.started = time.monotonic()
        lr = record.get("lr")
        attrs = {
            **self._attrs(SWEEP),
            "seed": job.config.seed,
            "attempt": job.attempt,
            "outcome": record["outcome"],
            "meta_iteration": index,
            "val_loss": record["val_loss"],
            "schedule": record["schedule"],
            "grad_norms": record["grad_norms"],
            "history": record["history"],
            "steps": record["steps"],
            "wall_time": round(record["seconds"], 4),
            "n_parameters": record["n_parameters"],
            "device": "cpu",
            **job.where,
        }
        in_range = lr is not None and LR_DISTRIBUTION.low <= lr <= LR_DISTRIBUTION.high
        if lr is not None:
            attrs["lr"] = lr
        stored = self._add(
            optuna.trial.create_trial(
                value=record["value"],
                params={"lr": lr} if in_range else {},
                distributions={"lr": LR_DISTRIBUTION} if in_range else {},
                user_attrs=attrs,
            )
        )
        self.recorded.add(index)
        c = self.counts[SWEEP]
        c.originals += 1
        if record["outcome"] == "diverged":
            c.diverged += 1
        else:
            c.complete += 1
            pair = [stored] if self.best is None else [self.best, stored]
            self.best = best_trial(pair, self.spec.objective.maximize)
        return False

    def record_tuned(self, job: TuneJob, summary: TuneSummary) -> None:
        """The tuning task returned: every meta-iteration it ran is stored."""
        budget = self.spec.budget.trials_per_arm
        if not summary.stopped and len(self.recorded) < budget:
            error = (
                f"the tuner ended after {summary.meta_iterations} meta-iterations; "
                f"{budget - len(self.recorded)} of the budget are missing"
            )
            self.record_tune_failure(job, error)
            return
        self.tuning = None
        self._recount_sweep()

    def record_tune_failure(self, job: TuneJob, error: str, *, interrupted: bool = False) -> None:
        """A FAIL trial for the run (no meta-iteration); the next run resumes (see above)."""
        attrs = {
            **self._attrs(SWEEP),
            "seed": job.config.seed,
            "attempt": job.attempt,
            "outcome": "failed",
            "error": error[:2000],
            "meta_iterations_stored": len(self.recorded),
            **job.where,
        }
        if interrupted:
            attrs["interrupted"] = True
        self._add(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs=attrs))
        self.tuning = None
        self._recount_sweep()

    # -- final seeds ---------------------------------------------------------------------------

    def ask_final(self, study: optuna.Study) -> Assignment:
        """A final seed: the best meta-iteration's schedule, retrained on the trial's seed."""
        assert self.best is not None
        role = FINAL
        best, spec = self.best, self.spec
        popped = self.counts[role].waiting > 0
        trial = study.ask()
        params: dict[str, Any] = {}
        if "lr" in best.params:  # enqueued with the best trial's params: suggest returns it
            params["lr"] = trial.suggest_float(
                "lr", LR_DISTRIBUTION.low, LR_DISTRIBUTION.high, log=True
            )
        seed = int(trial.user_attrs.get("seed", spec.seed))
        attempt = int(trial.user_attrs.get("attempt", 1))
        schedule = best.user_attrs["schedule"]
        attrs = {
            **self._attrs(role),
            "lr": best.user_attrs.get("lr"),
            "seed": seed,
            "attempt": attempt,
            "schedule_of": best.number,
            "schedule": schedule,
        }
        config = ScheduleConfig(
            task=spec.task,
            data=spec.data,
            model=spec.arm_model(self.arm),
            schedule=schedule,
            steps=self.steps,
            blocks=self.options.blocks,
            batch_size=self.batch_size,
            seed=seed,
            objective=spec.objective.metric,
            divergence_factor=spec.objective.divergence_factor,
        )
        return self.assign(role, trial, config, params, attrs, popped=popped, num_gpus=0.0)


ARM_RUN = HypergradArmRun  # what the registry (`worker.arms`) reads
