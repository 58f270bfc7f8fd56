"""The tuners: how an arm's sweep study is filled, and everything each tuner owns.

- `worker.arms.base`: the contract the driver (`worker.sweep`) drives — `ArmRun` (an arm's two
  Optuna studies, its final seeds, its counts), `Job` and `Assignment` (work handed to Ray and
  where its news goes) — the study names (`sweep_study_name`, `final_study_name`) and
  `best_trial`.
- `worker.arms.optuna`: `tuner: "optuna"`, a sweep of the search space by the spec's sampler.
- `worker.arms.hypergradient`: `tuner: "hypergradient"`, schedules learned by hypergradients.

Every tuner is a package laid out the same way: `spec` (its arm model `ARM_SPEC`, an
`worker.spec_base.ArmSpecBase` with a `tuner` literal; pydantic only, so reading a spec imports
neither Optuna nor PyTorch), `checks` (`check_arm` and `check_build`, run at submission), and
`arm` (its `ArmRun`, `ARM_RUN`, and the jobs it hands to Ray). A new tuner is such a package
and one line in `TUNERS`: the spec's arm union (`worker.spec.ArmSpec`), its checks
(`worker.spec_checks`) and the driver (`worker.sweep`) all read this registry. This `__init__`
imports nothing of the tuners until asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from types import ModuleType
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from worker.arms.base import ArmRun
    from worker.spec_base import ArmSpecBase

__all__ = ["TUNERS", "Tuner"]


@dataclass(frozen=True)
class Tuner:
    """A tuner: its name (the arm's `tuner`) and the package that holds it."""

    name: str
    package: str

    def arm_spec(self) -> type[ArmSpecBase]:
        """Its arm's model in a spec (light: pydantic only)."""
        return cast("type[ArmSpecBase]", import_module(f"{self.package}.spec").ARM_SPEC)

    def checks(self) -> ModuleType:
        """Its spec checks: `check_arm(spec, index, arm)`, `check_build(spec, index, arm)`."""
        return import_module(f"{self.package}.checks")

    def arm_run(self) -> type[ArmRun]:
        """Its `ArmRun`, which the driver runs the arm with."""
        return cast("type[ArmRun]", import_module(f"{self.package}.arm").ARM_RUN)


TUNERS: dict[str, Tuner] = {
    tuner.name: tuner
    for tuner in (
        Tuner("optuna", "worker.arms.optuna"),  # the first is the default
        Tuner("hypergradient", "worker.arms.hypergradient"),
    )
}
