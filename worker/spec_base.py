"""What the study spec is built from: its hard limits, the strict base model, its errors, and
what every arm has whatever its tuner (`ArmSpecBase`, `ModelOverrides`).

Kept apart from `worker.spec` so that the tuners' arm models (`worker.arms.hypergradient`) and
the cross-field checks (`worker.spec_checks`) can use them without importing the spec, which
imports them: no module here imports `worker.spec`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from worker.spec_options import SearchDimension
    from worker.spec_schedule import ScheduleSpec

__all__ = [
    "LABEL_PATTERN",
    "MAX_ARMS",
    "MAX_BATCH_SIZE",
    "MAX_CONCURRENT_TRIALS",
    "MAX_DEPTH",
    "MAX_EPOCHS",
    "MAX_FILE_VALUES",
    "MAX_FINAL_SEEDS",
    "MAX_HYPERGRAD_BLOCKS",
    "MAX_HYPERGRAD_DEPTH",
    "MAX_HYPERGRAD_PARAMETERS",
    "MAX_HYPERGRAD_STEPS",
    "MAX_HYPERGRAD_WIDTH",
    "MAX_PARAMETERS",
    "MAX_RETRIES",
    "MAX_STEPS_PER_EPOCH",
    "MAX_SYNTHETIC_VALUES",
    "MAX_TRIALS_PER_ARM",
    "MAX_TRIAL_TIMEOUT_S",
    "MAX_WIDTH",
    "MODEL_CONFIG",
    "ArmSpecBase",
    "ModelOverrides",
    "Problem",
    "Strict",
    "given_options",
    "spec_error",
    "trusted",
]

MAX_ARMS = 16
MAX_TRIALS_PER_ARM = 1000
MAX_EPOCHS = 1000
MAX_STEPS_PER_EPOCH = 100_000
MAX_FINAL_SEEDS = 20
MAX_CONCURRENT_TRIALS = 256
MAX_WIDTH = 4096
MAX_DEPTH = 64
MAX_PARAMETERS = 50_000_000
MAX_BATCH_SIZE = 8192
MAX_RETRIES = 5
MAX_TRIAL_TIMEOUT_S = 86_400.0
MAX_SYNTHETIC_VALUES = 200_000_000  # n_examples × input size of a synthetic dataset
MAX_FILE_VALUES = 200_000_000  # every array of a files dataset together (worker.tasks.files)
# The hypergradient tuner trains in exact fixed point on the CPU; its information buffer grows by
# log2(1/momentum) bits per parameter per step (0.15 at momentum 0.9, at most 16), so at these
# limits a run holds ~10 MB of buffer typically and 1 GB at worst (steps × parameters × 2 bytes).
# Every meta-iteration's trial stores its schedule (2 × blocks × tensors values), hence the block
# limit.
MAX_HYPERGRAD_STEPS = 5000
MAX_HYPERGRAD_BLOCKS = 100
MAX_HYPERGRAD_WIDTH = 512
MAX_HYPERGRAD_DEPTH = 4
MAX_HYPERGRAD_PARAMETERS = 100_000

# A cross-field problem: the field path, the message, the offending value (or None).
Problem = tuple[tuple[str | int, ...], str, Any]


def spec_error(message: str) -> PydanticCustomError:
    """A validation error whose message is shown unchanged (no "Value error, " prefix)."""
    return PydanticCustomError("spec", "{message}", {"message": message})


def trusted(info: ValidationInfo) -> bool:
    """Validating a stored spec (`StudySpec.from_stored`): the checks that depend on this
    machine (installed packages, registries, data, models built on the meta device) are
    skipped; the spec passed them when it was submitted."""
    return bool(info.context and info.context.get("stored"))


MODEL_CONFIG = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class Strict(BaseModel):
    """Unknown fields refused, no coercion, no NaN or infinity (see `worker.spec`)."""

    model_config = MODEL_CONFIG


LABEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.+=-]{0,63}$"


def _list_schemes(schema: dict[str, Any]) -> None:
    """List the known schemes in the JSON schema (the OpenAPI document), so that clients and
    generated requests see them. Called only when a schema is built: importing the registry
    costs torch's import, which validating a spec does not need until it names a scheme."""
    import optim

    schema["enum"] = list(optim.SCHEMES)


class ModelOverrides(Strict):
    """An arm's changes to the study's model options (unset fields keep the study's); a
    plugin model's own options are given by name, as in the study's `model`."""

    model_config = ConfigDict(**{**MODEL_CONFIG, "extra": "allow"})

    width: int | None = Field(None, ge=1, le=MAX_WIDTH)
    depth: int | None = Field(None, ge=1, le=MAX_DEPTH)
    activation: Literal["relu", "tanh"] | None = None
    transformed: bool | None = None
    transform_every: int | None = Field(None, ge=1, le=1_000_000)


def given_options(options: BaseModel) -> dict[str, Any]:
    """The model options a spec (`worker.spec.ModelOptions`) or an arm (`ModelOverrides`) sets:
    the built-in fields that differ from their defaults (None is always the default), and every
    option given by another name (a plugin model's)."""
    given = {
        name: getattr(options, name)
        for name, field in type(options).model_fields.items()
        if getattr(options, name) is not None and getattr(options, name) != field.default
    }
    given.update({k: v for k, v in (options.model_extra or {}).items() if v is not None})
    return given


# Every tuner's own fields, empty. Before arms were split by tuner, one arm model held them all,
# so every stored spec (a dump) has them: an arm drops another tuner's field when it is empty and
# dumps them back, so that stored specs load and a dump, and the hash of it that names a CLI
# study (`ratebench run` resumes a spec by it), is what it was.
_EVERY_TUNERS_FIELDS: dict[str, Any] = {"fixed": {}, "search_space": None, "hypergradient": None}


class ArmSpecBase(Strict):
    """What every arm has: a scheme, a label, model overrides. A tuner's arm (`tuner` selects
    it, `worker.spec.ArmSpec`) adds its own fields, and refuses another tuner's with the
    message in its `other_tuners_fields` (an empty one, as stored specs hold, is dropped)."""

    other_tuners_fields: ClassVar[dict[str, str]] = {}

    optimizer: str = Field(
        description="a key of optim.SCHEMES (GET /api/v1/schemes)",
        json_schema_extra=_list_schemes,
    )
    tuner: str  # each tuner's arm narrows it to its name (`worker.arms.TUNERS`)
    label: str | None = Field(None, pattern=LABEL_PATTERN, description="unique; default derived")
    model: ModelOverrides = Field(default_factory=ModelOverrides)

    @model_validator(mode="before")
    @classmethod
    def _other_tuners_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kept, refused = {}, []
        for key, value in data.items():
            if key in cls.other_tuners_fields and value == _EVERY_TUNERS_FIELDS.get(key):
                continue
            if key in cls.other_tuners_fields:
                error = spec_error(cls.other_tuners_fields[key])
                refused.append(InitErrorDetails(type=error, loc=(key,), input=value))
            kept[key] = value
        if refused:
            raise ValidationError.from_exception_data(cls.__name__, refused)
        return kept

    # What a tuner's arm may add to the study's settings (its own model overrides the defaults).

    def fixed_values(self) -> dict[str, bool | int | float]:
        """The scheme's hyperparameters the arm fixes ({}: none)."""
        return {}

    def own_search_space(self) -> dict[str, SearchDimension] | None:
        """The arm's entries that replace the study's search space (None: none)."""
        return None

    def own_schedule(self) -> ScheduleSpec | None:
        """The arm's learning-rate schedule (None: the constant rate)."""
        return None

    def run_steps(self, budget: Any) -> int | None:
        """How many optimizer steps one run of this arm takes when it is not the budget's
        `epochs × steps per epoch` (None: it is)."""
        return None

    @field_validator("optimizer")
    @classmethod
    def _known_scheme(cls, value: str, info: ValidationInfo) -> str:
        if trusted(info):
            return value
        import optim  # PyTorch: only where a spec is checked, not where one is read

        if value not in optim.SCHEMES:
            raise spec_error(f"unknown scheme {value!r}; known: {', '.join(optim.SCHEMES)}")
        return value

    @model_serializer(mode="wrap")
    def _every_tuners_fields(
        self, handler: SerializerFunctionWrapHandler, info: SerializationInfo
    ) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        if info.exclude_none or info.exclude_defaults or info.exclude_unset or info.exclude:
            return data
        if info.include:
            return data
        return {**data, **{k: v for k, v in _EVERY_TUNERS_FIELDS.items() if k not in data}}
