"""What a cohort's Ray task runs: `CohortWork`, K trials' configs trained as one batched model.

The Optuna arm (`worker.arms.optuna`) hands the driver one job for K trials; its work is a
`CohortWork`, and `run` returns one entry per member: the member's `TrialResult`, or a
`MemberError` when that member's own configuration failed (a value the scheme's constructor
refuses) while the others trained. Each member reports its epochs under its own trial key
(`reporter.under(key)`, the mailbox of `worker.remote`), so the driver's pruner answers each
trial on its own.

Members are grouped by `worker.cohort.cohort_key` (a searched boolean hyperparameter splits a
cohort in two); each group of two or more trains with `run_cohort`, a single member or a group
the engine refuses trains with `run_trial`, one after the other in the same task. An error that
is not the member's own (data that cannot be read, a machine error) fails the task, and with it
every member (`worker.sweep` records it for each). This module imports no Optuna: a Ray worker
unpickles it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import optim
from worker.cohort import CohortError, cohort_key, run_cohort
from worker.failures import classify_cause
from worker.runner import Reporter, TrialConfig, TrialResult, run_trial

__all__ = ["CohortWork", "MemberError"]


class KeyedReporter(Protocol):
    """The mailbox reporter of a task (`worker.remote`), which reports under other keys too."""

    def under(self, key: str) -> Reporter: ...


@dataclass(frozen=True)
class MemberError:
    """One member's own failure: `error` as `worker.failures` words it; `retry` False when the
    same configuration would fail again."""

    error: str
    retry: bool


@dataclass
class CohortWork:
    """K members' configs and the trial keys they report under (plain data: it pickles)."""

    configs: list[TrialConfig]
    keys: list[str]

    def run(self, reporter: KeyedReporter | None = None) -> list[TrialResult | MemberError]:
        reporters: list[Reporter | None] = [
            reporter.under(key) if reporter is not None else None for key in self.keys
        ]
        results: list[TrialResult | MemberError | None] = [None] * len(self.configs)
        groups: dict[Any, list[int]] = {}
        for i, config in enumerate(self.configs):
            try:
                key: Any = cohort_key(config)
            except optim.HyperparameterError:
                key = ("alone", i)  # trains alone, where its error is its own
            groups.setdefault(key, []).append(i)
        for members in groups.values():
            if len(members) > 1:
                try:
                    out = run_cohort(
                        [self.configs[i] for i in members], [reporters[i] for i in members]
                    )
                except (CohortError, optim.HyperparameterError, optim.UnsupportedModelError):
                    pass  # refused before training: each member alone, with its own error
                else:
                    for i, result in zip(members, out, strict=True):
                        results[i] = result
                    continue
            for i in members:
                try:
                    results[i] = run_trial(self.configs[i], reporters[i])
                except Exception as exc:
                    if len(self.configs) == 1:
                        raise  # as a single trial's task does
                    failure = classify_cause(exc)
                    results[i] = MemberError(failure.error, failure.retry)
        assert all(r is not None for r in results)
        return [r for r in results if r is not None]
