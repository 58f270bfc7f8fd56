"""The Optuna tuner's arm in a spec (`tuner: "optuna"`, the default): `OptunaArmSpec`.
Imports pydantic and the spec's value models only: reading a spec imports neither Optuna nor
PyTorch.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from worker.spec_base import ArmSpecBase
from worker.spec_options import SearchDimension
from worker.spec_schedule import ScheduleSpec

__all__ = ["ARM_SPEC", "OptunaArmSpec"]


class OptunaArmSpec(ArmSpecBase):
    """An arm swept by Optuna (`tuner: "optuna"`, the default): its scheme's `fixed`
    hyperparameters, and its `search_space` entries replacing the study's
    (`worker.arms.optuna.checks` checks them against the scheme)."""

    other_tuners_fields: ClassVar[dict[str, str]] = {
        "hypergradient": "options of the hypergradient tuner; this arm's tuner is 'optuna' "
        "(set tuner 'hypergradient', or drop this)",
    }

    tuner: Literal["optuna"] = Field("optuna", description="optuna (default) or hypergradient")
    fixed: dict[str, bool | int | float] = Field(default_factory=dict)
    search_space: dict[str, SearchDimension] | None = Field(
        None, description="replaces the study's entries of the same name for this arm"
    )
    schedule: ScheduleSpec | None = Field(
        None,
        description="the learning-rate schedule (default constant); its fields are swept as "
        "search_space entries schedule.<field>",
        exclude_if=lambda value: value is None,
    )

    def fixed_values(self) -> dict[str, bool | int | float]:
        return self.fixed

    def own_search_space(self) -> dict[str, SearchDimension] | None:
        return self.search_space

    def own_schedule(self) -> ScheduleSpec | None:
        return self.schedule


ARM_SPEC = OptunaArmSpec  # what the registry (`worker.arms`) reads
