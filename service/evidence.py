"""When two final-seed values are the same evidence: one configuration trained on one seed.

Training is deterministic for a configuration and a seed (`worker.runner` seeds torch before
anything else; on CPU the same configuration and seed give the same history), so a spec
submitted again reproduces its final values. Pooling them as further seeds counts one
observation two or three times and narrows the interval with no new information. The task
board, the performance profile and the home page's best arm therefore count each
(configuration, seed) pair once (`Evidence`).

A final seed's **configuration** is what decides its training, and nothing else:

- the arm's setting (`service.comparability.arm_setting`: the study's model and data options
  after the arm's overrides, the budget's epochs and steps, the objective, the arm's fixed
  hyperparameters, tuner and schedule); the task is the board's own;
- what the final seeds train with: the best sweep trial's parameters (`best_params`: the chosen
  rate and any other searched value, swept schedule fields included) and `best_lr`;
- the objective's `divergence_factor` (it decides whether a seed diverged, and so its value);
- for a tuner other than Optuna (the hypergradient tuner), the arm's own options, the study's
  seed and the best meta-iteration: its final seeds retrain a learned schedule, which those
  decide.

Left out, as they change no final seed's training once its configuration is given: where the
data lie, the search space, sampler, pruner and number of trials (they decide which
configuration is chosen, and the chosen one is part of the key), and the resources (device,
cohort size, concurrency: where and how fast, not what).

**Seeds.** A stored arm row lists the seed of each final value (`final_seeds`,
`worker.summary`). Rows stored before that was recorded have their seeds inferred when they
hold every final seed of their study: the seeds are then exactly `seed + 1 … seed + n`
(`worker.arms.base`), taken in that order (the order of their trials, which only a retried
seed changes). A row of that age missing some final seed cannot say which value is which
seed's; its values are never folded.

**Which value is kept.** The first stored (rows are read in the order they were stored,
so the earliest finished study's value counts). A re-run that reproduces it adds nothing; one
that does not (another machine, another device, a float32 cohort instead of a trial alone) is
counted as `disagreeing`, and its value is still not pooled: one seed of one configuration is
one observation, whichever machine made it. Boards show both counts.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from worker.spec import ArmSpec, StudySpec

__all__ = ["Evidence", "configuration_id", "row_seeds", "run_fields"]


def run_fields(spec: StudySpec, arm: ArmSpec | None) -> dict[str, Any]:
    """What decides an arm's final seeds beyond its setting and its chosen parameters."""
    fields: dict[str, Any] = {"divergence_factor": spec.objective.divergence_factor}
    if arm is not None and arm.tuner != "optuna":
        fields["arm"] = arm.model_dump(mode="json")
        fields["study_seed"] = spec.seed
    return fields


def configuration_id(
    setting_id: str, run: Mapping[str, Any], tuner: str | None, chosen: Mapping[str, Any]
) -> str:
    """The id of a final seed's configuration (module docstring): its arm setting's id, its
    `run_fields`, and from its stored row `best_params` and `best_lr` (and, for a tuner other
    than Optuna, `best_trial`)."""
    picked = {"best_params": chosen.get("best_params") or {}, "best_lr": chosen.get("best_lr")}
    if tuner != "optuna":
        picked["best_trial"] = chosen.get("best_trial")
    fields = {"setting": setting_id, "run": dict(run), "chosen": picked}
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def row_seeds(
    stored: Sequence[Any] | None, n_values: int, spec: StudySpec | None, row_id: Hashable
) -> list[Hashable]:
    """The seed of each of a row's `n_values` final values: the stored ones; else, when the
    row holds every final seed of its study, the study's seeds in order; else a key of its
    own per value (`row_id` and its position), which never matches another row's."""
    if stored is not None and len(stored) == n_values:
        return [int(seed) for seed in stored]
    if spec is not None and n_values == spec.budget.final_seeds:
        return [spec.seed + 1 + i for i in range(n_values)]
    return [("unmatched", row_id, i) for i in range(n_values)]


@dataclass
class Evidence:
    """The distinct final-seed values of one pool (a board's row, an arm on a task): each
    (configuration, seed) pair counted once, the first stored value kept."""

    values: list[float] = field(default_factory=list)
    reruns: int = 0  # values of pairs already counted, left out
    disagreeing: int = 0  # of those, the ones that differ from the kept value
    _kept: dict[tuple[str, Hashable], float] = field(default_factory=dict)

    def add(self, configuration: str, seeds: Sequence[Hashable], values: Sequence[float]) -> int:
        """One stored row's values (with their seeds) into the pool; how many were new."""
        new = 0
        for seed, value in zip(seeds, values, strict=True):
            key = (configuration, seed)
            kept = self._kept.get(key)
            if kept is None:
                self._kept[key] = value
                self.values.append(value)
                new += 1
                continue
            self.reruns += 1
            if not _same(kept, value):
                self.disagreeing += 1
        return new

    @property
    def n_seeds(self) -> int:
        return len(self.values)


def _same(a: float, b: float) -> bool:
    """The same value, up to the last bits a storage's number format may round."""
    return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
