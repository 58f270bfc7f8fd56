"""Every trial of a study, read back from the Optuna storage for people and plots.

`load_trials(storage_url, study_key, spec, arm=None)` lists the trials of every arm (or one),
sweep first then final seeds, each ordered by trial number. A trial's user attributes carry what
`worker.sweep` recorded:

- `arm`, `scheme`, `role`: the arm's label, its scheme, `sweep` or `final`;
- `lr` (also in params when searched), `seed`, `attempt` (1 + retries), `fixed` (the arm's
  fixed hyperparameters);
- `outcome`: `complete`, `pruned`, `diverged` or `failed`;
- `history`: per epoch `epoch`, `step`, `train_loss`, `val_loss`, `val_accuracy`, `wall_time`
  (seconds since training started), `examples_per_sec`;
- `layer_factors` (layer-wise schemes): `{"names": [...], "values": [[per layer] per epoch]}`;
- `test_loss`, `test_accuracy`: final seeds only;
- `steps`, `wall_time` (training and evaluation), `setup_time` (loading data, building the
  model), `n_parameters`, `device`;
- `pid`, `host`, `started_at` (Unix time): the Ray worker process that ran it;
- when present: `diverged_at_step`, `error` (a failed trial's, `<ExceptionType>: <message>`
  with server paths redacted), `retry_of` (the number of the failed trial this one repeats),
  `interrupted` (the driver stopped it: a cancel, a shutdown; retried without using up an
  attempt) and `deterministic` (True: the trial's own code raised, e.g. missing data or a
  configuration the optimizer refuses, so a retry would fail the same way and none was made;
  `worker.failures`).

Hypergradient arms (`tuner: "hypergradient"`, `worker.arms.hypergradient.arm`) add `tuner`; a sweep
trial is one meta-iteration, with `meta_iteration`, `val_loss`, `schedule` (the learned
hyperparameters, flat: `lr/b00/layer1.weight`, `momentum/…`, `init_scale/…`, `l2/…`),
`grad_norms`, and `lr` the SGD-equivalent rate; its `history` is one record (the run's end);
a failed or stopped tuning run is a FAIL trial with `meta_iterations_stored`. Their final
seeds carry `schedule` and `schedule_of` (the sweep trial it came from) and one `history`
record per schedule block (`epoch` = block).

A diverged trial is COMPLETE in Optuna with the metric's worst value (`worker.runner.
diverged_value`), so it appears at its rate on sensitivity curves and never wins; failed trials
are FAIL, pruned ones PRUNED (value: the last reported epoch).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker.arms.base import FINAL, SWEEP, final_study_name, sweep_study_name
from worker.storage import open_storage, study_trials

if TYPE_CHECKING:
    from worker.spec import StudySpec

__all__ = ["TrialRecord", "integrity_problems", "load_trials"]


@dataclass(frozen=True)
class TrialRecord:
    arm: str
    role: str  # "sweep" or "final"
    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    outcome: str | None
    value: float | None
    params: dict[str, Any]
    user_attrs: dict[str, Any]
    intermediate_values: dict[int, float]
    datetime_start: datetime | None
    datetime_complete: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "arm": self.arm,
            "role": self.role,
            "number": self.number,
            "state": self.state,
            "outcome": self.outcome,
            "value": self.value,
            "params": self.params,
            "user_attrs": self.user_attrs,
            "intermediate_values": self.intermediate_values,
            "datetime_start": self.datetime_start,
            "datetime_complete": self.datetime_complete,
        }


def load_trials(
    storage_url: str, study_key: str, spec: StudySpec, arm: str | None = None
) -> list[TrialRecord]:
    """The trials of study `study_key` (one arm's when `arm` is given)."""
    storage = open_storage(storage_url)
    records: list[TrialRecord] = []
    try:
        for label in spec.labels:
            if arm is not None and label != arm:
                continue
            for role, name in ((SWEEP, sweep_study_name), (FINAL, final_study_name)):
                for t in study_trials(storage, name(study_key, label)):
                    records.append(
                        TrialRecord(
                            arm=label,
                            role=role,
                            number=t.number,
                            state=t.state.name,
                            outcome=t.user_attrs.get("outcome"),
                            value=t.value if t.values is not None else None,
                            params=dict(t.params),
                            user_attrs=dict(t.user_attrs),
                            intermediate_values=dict(t.intermediate_values),
                            datetime_start=t.datetime_start,
                            datetime_complete=t.datetime_complete,
                        )
                    )
    finally:
        storage.engine.dispose()
    return records


def integrity_problems(records: list[TrialRecord], spec: StudySpec) -> list[str]:
    """What is wrong with a finished study's trials after faults, retries and resumes: a trial
    left RUNNING or WAITING, an Optuna arm's sweep that did not finish `trials_per_arm`
    configurations exactly once each (COMPLETE or PRUNED; a grid point run twice is a
    duplicate), and final seeds not each COMPLETE exactly once. [] when the study is whole."""
    problems: list[str] = []
    expected_seeds = {spec.seed + 1 + i for i in range(spec.budget.final_seeds)}
    for arm in spec.arms:
        label = str(arm.label)
        mine = [r for r in records if r.arm == label]
        for r in mine:
            if r.state in {"RUNNING", "WAITING"}:
                problems.append(f"{label}/{r.role}/{r.number}: left {r.state}")
        sweep = [r for r in mine if r.role == SWEEP and r.state in {"COMPLETE", "PRUNED"}]
        if arm.tuner == "optuna":
            runs = Counter(json.dumps(r.params, sort_keys=True) for r in sweep)
            for params, count in runs.items():
                if count > 1:
                    problems.append(f"{label}: configuration {params} finished {count} times")
            if len(runs) != spec.budget.trials_per_arm:
                problems.append(f"{label}: {len(runs)} of {spec.budget.trials_per_arm} "
                                "configurations finished")  # fmt: skip
        seeds = Counter(
            r.user_attrs.get("seed") for r in mine if r.role == FINAL and r.state == "COMPLETE"
        )
        if (seeds and set(seeds) != expected_seeds) or any(n > 1 for n in seeds.values()):
            problems.append(f"{label}: final seeds {dict(sorted(seeds.items()))}, expected "
                            f"{sorted(expected_seeds)} once each")  # fmt: skip
        if not seeds:
            problems.append(f"{label}: no final seed finished")
    return problems
