"""What every tuner's arm is to the driver: jobs, the arm's two Optuna studies, final seeds.

An arm owns a sweep study `<study key>/<label>` (`sweep_study_name`) and, once the sweep has
finished, a final study `<study key>/<label>/final` (`final_study_name`) holding one trial per
final seed with the sweep's best trial's parameters (`best_trial`: diverged trials excluded).
How the sweep study fills is the tuner's: `worker.arms.optuna` asks a sampler for
`budget.trials_per_arm` trials, `worker.arms.hypergradient.arm` stores the meta-iterations of
one tuning run. The final seeds are the same for every tuner, and so is this module's
bookkeeping of trials that Optuna hands out (`ArmRun.recover_trials`, `record_*`).

The driver (`worker.sweep`) knows only `ArmRun.next_assignment()` and the `Job` contract: a
job's `config` (a `Work`) runs in a Ray task (`worker.remote`) under `key`; the task's reports
and its end are passed to the job's `record_*` methods, which write to the arm's studies.

Budget and retries of trials handed out by Optuna, all recorded in the trials' user attributes
so that a resumed driver derives the same state from storage:
- a trial without `retry_of` is an *original*; a sweep hands out originals until there are
  `trials_per_arm` of them, whatever became of them;
- a failed trial is retried as a new trial with the same parameters (`retry_of` = its number,
  `attempt` + 1) while `attempt <= resources.max_retries`; a trial the driver itself stopped
  (`interrupted`) is retried without using up an attempt; a trial that failed
  `deterministic`ally (its own code raised: `worker.failures`) is never retried;
- a trial found RUNNING when a driver starts is stale (the previous driver died, or the Ray
  runtime under it): it is failed and retried as an interrupted one, without using up an
  attempt, since its end was the driver's and not the trial's (a study whose drivers keep
  dying is bounded at the study level, `RATEBENCH_MAX_ATTEMPTS`);
- when a study ends, `close_unfinished` fails whatever it left RUNNING or WAITING (a study
  that failed or was cancelled mid-sweep), so no tool shows its trials as still running.

An arm whose trials all failed (the sweep's, or every final seed) is `failed`, with the first
error its trials recorded (`first_error`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, Self

import optuna
from optuna.trial import FrozenTrial, TrialState

from worker.trial import epoch_objective

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = [
    "FINAL",
    "SWEEP",
    "ArmRun",
    "Assignment",
    "Counts",
    "Job",
    "Work",
    "WorkReporter",
    "best_trial",
    "close_unfinished",
    "final_study_name",
    "study_name_prefix",
    "sweep_study_name",
]

SWEEP, FINAL = "sweep", "final"


def study_name_prefix(study_key: str) -> str:
    """What every Optuna study of a ratebench study is named with first (the naming rule:
    `<study key>/<arm label>` for the sweep, `<study key>/<arm label>/final` for the final
    seeds); a reader of the study's trials selects them by it."""
    return f"{study_key}/"


def sweep_study_name(study_key: str, label: str) -> str:
    return f"{study_name_prefix(study_key)}{label}"


def final_study_name(study_key: str, label: str) -> str:
    return f"{study_name_prefix(study_key)}{label}/final"


def best_trial(trials: list[FrozenTrial], maximize: bool) -> FrozenTrial | None:
    """The best finished trial that did not diverge (first of equals)."""
    candidates = [
        t
        for t in trials
        if t.state == TrialState.COMPLETE and t.user_attrs.get("outcome") != "diverged"
    ]
    if not candidates:
        return None
    key = (lambda t: -t.value) if maximize else (lambda t: t.value)
    return min(candidates, key=lambda t: (key(t), t.number))


def close_unfinished(storage: Any, study_key: str, labels: list[str], reason: str) -> int:
    """Fail every RUNNING or WAITING trial of the arms' Optuna studies (sweep and final), as
    interrupted with `reason`: a study that ended (failed, cancelled) runs none of them, and
    Optuna's tools would otherwise show them running or waiting forever. A later resume (a
    `ratebench run` of the same spec) retries them as any interrupted trial. Returns how many."""
    closed = 0
    for label in labels:
        for name in (sweep_study_name(study_key, label), final_study_name(study_key, label)):
            try:
                study_id = storage.get_study_id_from_name(name)
            except KeyError:  # not created: the study ended before this arm got that far
                continue
            states = (TrialState.RUNNING, TrialState.WAITING)
            for t in storage.get_all_trials(study_id, deepcopy=False, states=states):
                storage.set_trial_user_attr(t._trial_id, "outcome", "failed")
                storage.set_trial_user_attr(t._trial_id, "error", reason[:2000])
                storage.set_trial_user_attr(t._trial_id, "interrupted", True)
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                closed += 1
    return closed


class WorkReporter(Protocol):
    """Where a running job's reports go (the mailbox, in a Ray task); True stops the work."""

    def report(self, index: int, payload: Any) -> bool: ...


class Work(Protocol):
    """What a job runs in its Ray task: plain data that pickles, with a `run` method."""

    def run(self, reporter: Any) -> Any: ...


class Job(ABC):
    """Work the driver hands to Ray for an arm, and where the news of it goes.

    The job's `config` runs in a Ray task under `key`; the messages from the task and its end
    are passed to the `record_*` methods, which write to the arm's studies. `started`
    (monotonic seconds) is when the trial timeout starts counting (a job may restart it);
    `num_gpus` None means `resources.gpus_per_trial`.
    """

    config: Work
    attempt: int
    started: float
    num_gpus: float | None = None

    @property
    @abstractmethod
    def key(self) -> str: ...

    @abstractmethod
    def record_start(
        self, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None: ...

    @abstractmethod
    def record_report(self, index: int, payload: Any) -> bool:
        """A report of the running work; True stops the task."""

    @abstractmethod
    def record_result(self, result: Any) -> None: ...

    @abstractmethod
    def record_failure(self, error: str, *, interrupted: bool = False, retry: bool = True) -> None:
        """The task failed; `retry` False: it would fail the same way again (no retry)."""

    def routes(self) -> dict[str, Job]:
        """The keys the task's messages come under, and the job each goes to: the job's own
        key, and for a cohort each member trial's key too (its reports go to that trial)."""
        return {self.key: self}

    @property
    def trials(self) -> int:
        """How many trials the task trains: `resources.trial_timeout_s` is per trial, so a
        cohort's task may take that many times as long."""
        return 1

    @property
    def awaits_answers(self) -> bool:
        """Whether the task must wait for the answer to each report (a pruner may stop it).
        When no answer can stop it, the task reports without waiting and the driver records
        from its result whatever report had not arrived (`worker.remote`)."""
        return True


@dataclass
class Assignment(Job):
    """A trial Optuna handed out (a sweep trial or a final seed): where it belongs, what it
    runs. Its reports are epochs' objectives; its result a `worker.runner.TrialResult`."""

    arm: ArmRun
    role: str
    trial: optuna.Trial
    config: Work
    params: dict[str, Any]
    attempt: int
    seed: int
    started: float = field(default_factory=time.monotonic)
    num_gpus: float | None = None
    reported: set[int] = field(default_factory=set)  # the epochs whose objective is stored

    @property
    def key(self) -> str:
        return f"{self.arm.label}/{self.role}/{self.trial.number}"

    @property
    def awaits_answers(self) -> bool:
        return not isinstance(self.arm.study(self.role).pruner, optuna.pruners.NopPruner)

    def record_start(
        self, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None:
        self.arm.record_start(self, pid, host, at, node)

    def record_report(self, index: int, payload: Any) -> bool:
        return self.arm.record_report(self, index, float(payload))

    def record_result(self, result: Any) -> None:
        self.arm.record_result(self, result)

    def record_failure(self, error: str, *, interrupted: bool = False, retry: bool = True) -> None:
        self.arm.record_failure(self, error, interrupted=interrupted, retry=retry)


@dataclass
class Counts:
    originals: int = 0
    complete: int = 0  # finished, not diverged
    diverged: int = 0
    pruned: int = 0
    failed: int = 0  # every failed attempt
    exhausted: int = 0  # failed with no retry left
    running: int = 0
    waiting: int = 0  # retries (and final seeds) enqueued, not started

    @property
    def done(self) -> int:
        return self.complete + self.diverged + self.pruned + self.exhausted

    def start(self, popped: bool) -> None:
        """Count a trial handed out: an enqueued one (`popped`: a retry or a final seed) or a
        new original."""
        self.running += 1
        if popped:
            self.waiting -= 1
        else:
            self.originals += 1


class ArmRun(ABC):
    """One arm's state, derived from storage at start and kept up to date as results come.

    A tuner subclasses it and fills in how its sweep runs: `sweep_sampler`, `recover_sweep`,
    `sweep_done`, `next_sweep_job` and `ask_final` (the final seed's work). The final seeds,
    their retries and the counts are kept here.

    Made in two steps, `ArmRun.open(spec, index, storage, study_key)`: the constructor sets
    fields only (the base's, then a subclass's own), and `open_studies` then opens the Optuna
    studies, which calls the tuner's methods (`sweep_sampler`, `cohort_choice`) on a fully
    constructed arm.
    """

    def __init__(self, spec: StudySpec, index: int, storage: Any, study_key: str) -> None:
        self.spec, self.storage, self.study_key = spec, storage, study_key
        self.arm = spec.arms[index]
        self.label, self.scheme = str(self.arm.label), self.arm.optimizer
        self.cohort_size = 1
        self.final: optuna.Study | None = None
        self.no_final = False  # the sweep ended without a usable best trial
        self.counts = {SWEEP: Counts(), FINAL: Counts()}
        self.best: FrozenTrial | None = None
        self.first_error: str | None = None  # of the arm's first failed trial (not interrupted)

    @classmethod
    def open(cls, spec: StudySpec, index: int, storage: Any, study_key: str) -> Self:
        """The arm, constructed, with its Optuna studies opened (`open_studies`)."""
        run = cls(spec, index, storage, study_key)
        run.open_studies()
        return run

    def open_studies(self) -> None:
        """Open the sweep study (with the tuner's sampler; its cohort size recorded) and, when
        it exists, the final study."""
        self.sweep = self.open_study(SWEEP)
        self.sweep.sampler = self.sweep_sampler()
        self.cohort_size, note = self.cohort_choice()
        attrs = self.sweep.user_attrs
        if attrs.get("cohort_size") != self.cohort_size or attrs.get("cohort_note") != note:
            self.sweep.set_user_attr("cohort_size", self.cohort_size)  # shown, and resumed as is
            self.sweep.set_user_attr("cohort_note", note)
        try:
            self.storage.get_study_id_from_name(final_study_name(self.study_key, self.label))
            self.final = self.open_study(FINAL)
        except KeyError:
            pass

    # -- what a tuner fills in -----------------------------------------------------------------

    @abstractmethod
    def sweep_sampler(self) -> optuna.samplers.BaseSampler:
        """The sampler of the sweep study."""

    def sweep_pruner(self) -> optuna.pruners.BasePruner:
        """The pruner of the sweep study (none by default)."""
        return optuna.pruners.NopPruner()

    @abstractmethod
    def recover_sweep(self) -> None:
        """Derive the sweep's state from storage (a resumed driver starts here)."""

    @property
    @abstractmethod
    def sweep_done(self) -> bool: ...

    @abstractmethod
    def next_sweep_job(self) -> Job | None:
        """The sweep's next job, or None while it has nothing to start."""

    @abstractmethod
    def ask_final(self, study: optuna.Study) -> Job:
        """The next final seed (or a cohort of them): asked from `study`, with the best sweep
        trial's work."""

    def cohort_choice(self) -> tuple[int, str | None]:
        """The arm's effective cohort size (`resources.cohort_size`) and, when it is 1 against
        the spec's wish, why. A tuner that runs one trial per task keeps the default."""
        return 1, f"the {self.arm.tuner} tuner runs one trial per task"

    # -- the studies ---------------------------------------------------------------------------

    def open_study(self, role: str) -> optuna.Study:
        name = (sweep_study_name if role == SWEEP else final_study_name)(self.study_key, self.label)
        study = optuna.create_study(
            storage=self.storage,
            study_name=name,
            direction=self.spec.objective.direction,
            sampler=optuna.samplers.RandomSampler(seed=self.spec.seed),
            pruner=self.sweep_pruner() if role == SWEEP else optuna.pruners.NopPruner(),
            load_if_exists=True,
        )
        if "arm" not in study.user_attrs:
            attrs = {
                "study_key": self.study_key,
                "arm": self.label,
                "scheme": self.scheme,
                "tuner": self.arm.tuner,
                "role": role,
                "metric": self.spec.objective.metric,
            }
            for key, value in attrs.items():
                study.set_user_attr(key, value)
        return study

    def study(self, role: str) -> optuna.Study:
        study = self.sweep if role == SWEEP else self.final
        assert study is not None
        return study

    # -- recovery and bookkeeping -------------------------------------------------------------

    def recover(self) -> None:
        """Fail stale RUNNING trials, enqueue missing retries, count what storage holds."""
        self.recover_sweep()
        if self.final is not None:
            self.recover_trials(FINAL, self.final)
        if self.final is None and self.sweep_done:
            self.start_final()

    def recover_trials(self, role: str, study: optuna.Study) -> None:
        """A study of trials Optuna hands out: stale ones failed, retries enqueued, counted."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            trial = optuna.Trial(study, t._trial_id)
            trial.set_user_attr("outcome", "failed")
            trial.set_user_attr("error", "stale: its driver stopped before it finished")
            trial.set_user_attr("interrupted", True)
            study.tell(t.number, state=TrialState.FAIL)
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        for t in trials:
            if t.state == TrialState.FAIL and t.number not in retried and self._retry_ok(t):
                self._enqueue_retry(study, t.params, t.user_attrs, t.number)
        self.recount_trials(role, study)

    def _retry_ok(self, t: FrozenTrial) -> bool:
        if t.user_attrs.get("deterministic"):
            return False
        attempt = int(t.user_attrs.get("attempt", 1))
        return bool(t.user_attrs.get("interrupted")) or attempt <= self.spec.resources.max_retries

    def _enqueue_retry(
        self, study: optuna.Study, params: dict[str, Any], attrs: dict[str, Any], number: int
    ) -> None:
        attempt = int(attrs.get("attempt", 1)) + (0 if attrs.get("interrupted") else 1)
        retry = {"retry_of": number, "attempt": attempt}
        if "seed" in attrs:
            retry["seed"] = attrs["seed"]
        study.enqueue_trial(params, user_attrs=retry)

    def recount_trials(self, role: str, study: optuna.Study) -> None:
        """The counts of a study of trials Optuna hands out (and the sweep's best)."""
        trials = study.get_trials(deepcopy=False)
        retried = {t.user_attrs.get("retry_of") for t in trials}
        c = Counts()
        for t in trials:
            c.originals += "retry_of" not in t.user_attrs
            c.running += t.state == TrialState.RUNNING
            c.waiting += t.state == TrialState.WAITING
            c.pruned += t.state == TrialState.PRUNED
            if t.state == TrialState.COMPLETE:
                if t.user_attrs.get("outcome") == "diverged":
                    c.diverged += 1
                else:
                    c.complete += 1
            if t.state == TrialState.FAIL:
                c.failed += 1
                c.exhausted += t.number not in retried and not self._retry_ok(t)
                self._note_error(t.user_attrs)
        self.counts[role] = c
        if role == SWEEP:
            self.best = best_trial(trials, self.spec.objective.maximize)

    def _note_error(self, attrs: dict[str, Any]) -> None:
        if self.first_error is None and not attrs.get("interrupted") and attrs.get("error"):
            self.first_error = str(attrs["error"])

    @property
    def failed(self) -> bool:
        """Every trial of the sweep, or every final seed, failed: the arm has no result."""
        if not self.done:
            return False
        for role in (SWEEP, FINAL):
            c = self.counts[role]
            if c.failed and not (c.complete or c.diverged or c.pruned):
                return True
        return False

    @property
    def done(self) -> bool:
        if not self.sweep_done:
            return False
        c = self.counts[FINAL]
        return self.no_final or (self.final is not None and c.waiting == 0 and c.running == 0)

    def start_final(self) -> None:
        """Open the final study and enqueue the missing final seeds with the best parameters."""
        if self.best is None:
            self.no_final = True
            return
        self.final = self.open_study(FINAL)
        self.final.set_user_attr("best_trial", self.best.number)
        existing = {t.user_attrs.get("seed") for t in self.final.get_trials(deepcopy=False)}
        for i in range(self.spec.budget.final_seeds):
            seed = self.spec.seed + 1 + i
            if seed not in existing:
                self.final.enqueue_trial(self.best.params, user_attrs={"seed": seed, "attempt": 1})
        self.recount_trials(FINAL, self.final)

    # -- handing out jobs and recording their ends ----------------------------------------------

    def next_assignment(self) -> Job | None:
        """The next job to run, or None while this arm has nothing to start."""
        if not self.sweep_done:
            return self.next_sweep_job()
        if self.final is None and not self.no_final:
            self.start_final()
        if self.final is not None and self.counts[FINAL].waiting > 0:
            return self.ask_final(self.final)
        return None

    def assign(
        self,
        role: str,
        trial: optuna.Trial,
        config: Work,
        params: dict[str, Any],
        attrs: dict[str, Any],
        *,
        popped: bool,
        num_gpus: float | None = None,
    ) -> Assignment:
        """The job for a trial Optuna just handed out (`popped`: an enqueued one): `attrs`
        (with its `seed` and `attempt`; None values left out) recorded on the trial, the trial
        counted as started."""
        for key, value in attrs.items():
            if value is not None:
                trial.set_user_attr(key, value)
        self.counts[role].start(popped)
        return Assignment(
            arm=self,
            role=role,
            trial=trial,
            config=config,
            params=params,
            attempt=int(attrs["attempt"]),
            seed=int(attrs["seed"]),
            num_gpus=num_gpus,
        )

    def record_report(self, a: Assignment, epoch: int, value: float) -> bool:
        """Store an epoch's objective; True when the pruner stops the trial."""
        a.trial.report(value, epoch)
        a.reported.add(epoch)
        return a.awaits_answers and a.trial.should_prune()  # no pruner: spare the read

    def record_start(
        self, a: Assignment, pid: int, host: str, at: float, node: dict[str, Any] | None = None
    ) -> None:
        a.trial.set_user_attr("pid", pid)
        a.trial.set_user_attr("host", host)
        a.trial.set_user_attr("started_at", at)
        if node is not None:  # the machine (`worker.environment.node`)
            a.trial.set_user_attr("node", node)

    def record_result(self, a: Assignment, result: Any) -> None:
        """A `worker.runner.TrialResult`: its attributes stored, the epochs' objectives whose
        report had not arrived (sent without waiting, `Job.awaits_answers`) stored from its
        history, the trial told."""
        for key, value in result.user_attrs().items():
            a.trial.set_user_attr(key, value)
        for record in result.history:
            if record.epoch not in a.reported:
                a.trial.report(epoch_objective(self.spec.objective.metric, record), record.epoch)
                a.reported.add(record.epoch)
        study, c = self.study(a.role), self.counts[a.role]
        c.running -= 1
        if result.outcome == "pruned":
            study.tell(a.trial, state=TrialState.PRUNED)
            c.pruned += 1
            return
        frozen = study.tell(a.trial, result.value)
        if result.outcome == "diverged":
            c.diverged += 1
            return
        c.complete += 1
        if a.role == SWEEP and (
            self.best is None
            or best_trial([self.best, frozen], self.spec.objective.maximize) is frozen
        ):
            self.best = frozen

    def record_failure(
        self, a: Assignment, error: str, *, interrupted: bool = False, retry: bool = True
    ) -> None:
        """Fail the trial and enqueue its retry when attempts remain (never when `retry` is
        False: a deterministic error)."""
        a.trial.set_user_attr("outcome", "failed")
        a.trial.set_user_attr("error", error[:2000])
        attrs: dict[str, Any] = {"attempt": a.attempt}
        if interrupted:
            a.trial.set_user_attr("interrupted", True)
            attrs["interrupted"] = True
        elif not retry:
            a.trial.set_user_attr("deterministic", True)
        self._note_error({**attrs, "error": error[:2000]})
        if a.role == FINAL:
            attrs["seed"] = a.seed
        study, c = self.study(a.role), self.counts[a.role]
        study.tell(a.trial, state=TrialState.FAIL)
        c.running -= 1
        c.failed += 1
        if interrupted or (retry and a.attempt <= self.spec.resources.max_retries):
            self._enqueue_retry(study, a.params, attrs, a.trial.number)
            c.waiting += 1
        else:
            c.exhausted += 1
