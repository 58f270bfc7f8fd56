"""The values a study spec's parts share: a searched hyperparameter (`SearchDimension`), the
data options (`DataOptions`) and the model options (`ModelOptions`). A trial's configuration
(`worker.runner.TrialConfig`) and every tuner's arm model use them, and `worker.spec` builds
the study spec from them; kept apart so that none of those imports the spec itself.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from worker.spec_base import (
    MAX_BATCH_SIZE,
    MAX_DEPTH,
    MAX_WIDTH,
    MODEL_CONFIG,
    Strict,
    spec_error,
)

__all__ = ["DataOptions", "ModelOptions", "SearchDimension"]


class SearchDimension(Strict):
    """One searched hyperparameter: a range (`low`, `high`, `log`), a list of `values`, or the
    string `"auto"`: each arm's scheme's registered sweep range (`optim.SCHEMES`)."""

    low: float | None = None
    high: float | None = None
    log: bool = False
    values: list[bool | int | float] | None = Field(None, min_length=1, max_length=100)
    auto: bool = Field(False, description='"auto": the range registered for the arm\'s scheme')

    @model_validator(mode="before")
    @classmethod
    def _from_auto(cls, data: Any) -> Any:
        return {"auto": True} if data == "auto" else data

    @model_validator(mode="after")
    def _range(self) -> SearchDimension:
        if self.auto:
            if self.low is not None or self.high is not None or self.values is not None:
                raise spec_error('"auto" takes the scheme\'s range; give no low/high/values')
            return self
        if self.values is not None:
            if self.low is not None or self.high is not None:
                raise spec_error("give either values or low/high, not both")
            return self
        if self.low is None or self.high is None:
            raise spec_error("give low and high (or a list of values)")
        if not self.low < self.high:
            raise spec_error(f"low must be < high, got low={self.low:g}, high={self.high:g}")
        if self.log and self.low <= 0:
            raise spec_error(f"a log scale needs low > 0, got {self.low:g}")
        return self

    def for_scheme(self, scheme: str, name: str) -> SearchDimension:
        """This dimension for an arm of `scheme`: `"auto"` becomes the scheme's registered
        range for `name` (its valid range when none is registered; both values of a flag)."""
        import optim

        if not self.auto or name not in {h.name for h in optim.SCHEMES[scheme].hyperparameters}:
            return self
        hp = optim.SCHEMES[scheme].hyperparameter(name)
        if hp.type == "bool":
            return SearchDimension(values=[False, True])
        low, high = hp.search or (hp.low, hp.high)
        if low is None or high is None:
            return self
        return SearchDimension(low=low, high=high, log=hp.log)


class DataOptions(Strict):
    """How the task's data are split and batched (the same for every arm)."""

    batch_size: int = Field(128, ge=1, le=MAX_BATCH_SIZE)
    split_seed: int = Field(0, ge=0, description="seed of the train/validation split")
    val_fraction: float = Field(0.2, gt=0, lt=1, description="of the training pool")
    n_train: int | None = Field(None, ge=1, description="cap on training examples")
    n_val: int | None = Field(None, ge=1, description="validation examples (overrides fraction)")
    n_test: int | None = Field(None, ge=1, description="cap on test examples")
    data_dir: str | None = Field(
        None, description="cifar10/cifar100, files: the folder (under the data roots)"
    )
    input_shape: list[int] | None = Field(
        None, min_length=1, max_length=3, description="synthetic: [features] or [C, H, W]"
    )
    n_classes: int | None = Field(
        None, ge=2, le=1000, description="synthetic, files: classes (files: largest label + 1)"
    )
    n_examples: int | None = Field(None, ge=10, le=1_000_000, description="synthetic: examples")

    @field_validator("input_shape")
    @classmethod
    def _shape(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and (len(value) == 2 or not all(1 <= v <= 4096 for v in value)):
            raise spec_error(f"must be [features] or [channels, height, width], got {value}")
        return value


class ModelOptions(Strict):
    """The task's model options (`GET /api/v1/tasks` lists each task's, with defaults and
    bounds); `None` width/depth take the model's defaults. The fields below are the built-in
    models'; a plugin's model declares its own options, given here by name and checked against
    its declaration (`worker.spec_checks`)."""

    model_config = ConfigDict(**{**MODEL_CONFIG, "extra": "allow"})

    width: int | None = Field(None, ge=1, le=MAX_WIDTH, description="units or base channels")
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH, description="hidden layers or blocks")
    activation: Literal["relu", "tanh"] = Field("relu", description="mlp only")
    transformed: bool = Field(False, description="mlp only: transformed tanh units + shortcuts")
    transform_every: int = Field(100, ge=1, le=1_000_000, description="steps between updates")
