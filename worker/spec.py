"""The study spec: what a user submits (a JSON file for `ratebench run`, the body of
`POST /api/v1/studies`), validated here and nowhere else.

A study compares *arms* on one *task*. An arm is a scheme from `optim.SCHEMES` with fixed
hyperparameters and model options (e.g. `transformed`); every arm gets the same budget: its own
Optuna study of `budget.trials_per_arm` trials over the search space (learning rate by default),
then `budget.final_seeds` re-runs of its best configuration on fresh seeds.

Errors carry the field path in pydantic's `loc` and say what is wrong in words
(`arms.1.optimizer: unknown scheme 'foo'; known: sgd, adam, adamw`); `format_errors` turns a
`ValidationError` into those lines. Hard limits are the `MAX_*` constants (`worker.spec_base`).

Choices:
- Arm labels name the arm's Optuna studies (`<study key>/<label>`), so they must be unique and
  stable: the default is the scheme plus the model options the arm overrides
  (`sgd+transformed`), made unique with `-2`, `-3`, … in spec order.
- An arm's search space is the study's, with the arm's own `search_space` entries replacing
  entries of the same name; a hyperparameter is either fixed or searched, never both.
- The objective is measured on the validation split; `val_accuracy` is maximised and
  `val_loss` minimised (the direction may be given, but must agree). The metric must be one the
  task reports (`worker.tasks.losses`): a regression task has `val_loss`, its mean squared
  error, and no accuracy, so there the metric defaults to `val_loss`.
- `tuner` is `optuna` (the sweep) or `hypergradient`: `optim.hypergrad` learns the arm's
  per-block, per-tensor SGD-with-momentum schedule by exact hypergradients through reversible
  training, one Optuna trial per meta-iteration (`budget.trials_per_arm` meta-iterations), then
  the best schedule is retrained on the final seeds. An arm is the model of its tuner
  (`ArmSpec`, a union discriminated by `tuner`, absent meaning `optuna`): `OptunaArmSpec` has
  `fixed` and `search_space`, `HypergradientArmSpec` (`worker.arms.hypergradient`) its
  `hypergradient` options; both share `ArmSpecBase` (`worker.spec_base`), and a field of the
  other tuner's is refused with a message at its own path. Errors are reported at the arm's
  fields as written (`arms.0.fixed.lr`), never under the tuner's name. Each tuner owns its
  cross-field checks (`worker.arms.optuna`, `worker.arms.hypergradient`: the hypergradient
  tuner needs the `sgd` scheme, the ReLU `mlp` on vector features and the `val_loss`
  objective); `worker.spec_checks` runs them with the checks of data and models.
- An Optuna arm may carry a learning-rate `schedule` (`worker.spec_schedule.ScheduleSpec`:
  constant by default, cosine, linear or step, each with an optional warm-up); its fields are
  swept as search-space entries `schedule.<field>`. An arm without one dumps without the field,
  so the dump (and a CLI study's key, a hash of it) of a spec without schedules is unchanged.
- Stored specs are trusted data: `StudySpec.from_stored` (every read of a stored study: the
  scheduler, the API, plots, the CLI) migrates a spec of an older `version` (absent: 1) to
  `SPEC_VERSION` and validates it without the checks that depend on the machine (installed
  packages, registries, data, the build probes; `worker.spec_base.trusted`), so a study stays
  readable where it was not submitted. The limits are `worker.spec_base`'s `MAX_*`; a change
  that would refuse stored specs comes with a version and a migration (`_MIGRATIONS`).
- A scheme's variant switches (`optim.registry.Hyperparameter.pinned`: bmp's `propagate` and
  `mean_over_positions`) are written into an arm that leaves them out, at submit, so that a
  later change of their default changes no stored arm; a stored arm without one predates
  pinning and reads back with the default of its day (`_pin_stored_variants`).
- Types are strict: a number given as a string (`"epochs": "3"`) or a boolean (`true`) is
  refused rather than coerced, and NaN, ±Infinity (and numbers that overflow to it, `1e400`)
  are refused wherever a number may appear. Every string, and every key, is checked for NUL
  bytes and lone surrogates before anything else: neither can be stored in PostgreSQL's JSON
  nor encoded as UTF-8, so they are refused at the edge with their field path.
- `StudySpec.estimated_steps` is the study's cost in optimizer steps, arms × (trials + final
  seeds) × epochs × steps per epoch (one pass over the training split when
  `budget.steps_per_epoch` is unset); the service refuses a spec whose estimate exceeds its
  configured maximum. The spec itself only bounds each factor (the `MAX_*` constants).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError
from pydantic_core.core_schema import ErrorType

from worker.arms import TUNERS
from worker.spec_base import (
    MAX_ARMS,
    MAX_CONCURRENT_TRIALS,
    MAX_EPOCHS,
    MAX_FINAL_SEEDS,
    MAX_RETRIES,
    MAX_STEPS_PER_EPOCH,
    MAX_TRIAL_TIMEOUT_S,
    MAX_TRIALS_PER_ARM,
    MODEL_CONFIG,
    ArmSpecBase,
    ModelOverrides,
    Strict,
    spec_error,
    trusted,
)
from worker.spec_options import DataOptions, ModelOptions, SearchDimension
from worker.spec_schedule import ScheduleSpec

__all__ = [
    "MAX_JSON_DEPTH",
    "SPEC_VERSION",
    "ArmSpec",
    "ArmSpecBase",
    "Budget",
    "DataOptions",
    "ModelOptions",
    "ModelOverrides",
    "Objective",
    "PrunerSpec",
    "Resources",
    "SamplerSpec",
    "ScheduleSpec",
    "SearchDimension",
    "StudySpec",
    "format_errors",
    "raw_input_problems",
    "warm_up_checks",
]

# The spec's format; `StudySpec.from_stored` migrates older stored specs to it (`_MIGRATIONS`).
SPEC_VERSION = 1


def _list_tasks(schema: dict[str, Any]) -> None:
    """List the known tasks in the JSON schema (the OpenAPI document), as `worker.spec_base`
    lists the schemes; called only when a schema is built."""
    from worker.tasks import tasks

    schema["enum"] = list(tasks())


_TUNERS = tuple(TUNERS)  # the tags of `ArmSpec`; the first is the default
_DEFAULT_TUNER = _TUNERS[0]


def _tuner_of(arm: Any) -> str:
    """The arm's tuner: its `tuner`, the default (optuna) when absent (pydantic's
    discriminator)."""
    if isinstance(arm, dict):
        return str(arm.get("tuner", _DEFAULT_TUNER))
    return str(getattr(arm, "tuner", _DEFAULT_TUNER))


def _without_tag(arm: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """Validate an arm by its tuner's model, its errors at the arm's own field paths.

    Pydantic's tagged union puts the tag into every error's location (`arms.0.optuna.fixed.lr`);
    users see `arms.0.fixed.lr`, as the spec is written. An unknown tuner is reported at
    `tuner`, with the known ones."""
    if isinstance(arm, dict) and "tuner" in arm and arm["tuner"] not in _TUNERS:
        message = f"unknown tuner {arm['tuner']!r}; known: {', '.join(_TUNERS)}"
        error = InitErrorDetails(type=spec_error(message), loc=("tuner",), input=arm["tuner"])
        raise ValidationError.from_exception_data("ArmSpec", [error])
    try:
        return handler(arm)
    except ValidationError as exc:
        tag = _tuner_of(arm)
        errors = [_untagged(item, tag) for item in exc.errors()]
        raise ValidationError.from_exception_data(exc.title, errors) from None


_KNOWN_ERRORS = frozenset(get_args(ErrorType))


def _untagged(item: ErrorDetails, tag: str) -> InitErrorDetails:
    """`item` without `tag` at the start of its location, otherwise as it was."""
    loc = item["loc"][1:] if item["loc"][:1] == (tag,) else item["loc"]
    if item["type"] in _KNOWN_ERRORS:  # pydantic's own: rebuilt from its type and context
        details = InitErrorDetails(type=item["type"], loc=loc, input=item["input"])
        if "ctx" in item:
            details["ctx"] = item["ctx"]
        return details
    error = PydanticCustomError(item["type"], item["msg"])  # ours (`spec_error`): its words
    return InitErrorDetails(type=error, loc=loc, input=item["input"])


# An arm: its `tuner` (absent: optuna) selects the model, one per tuner of the registry
# (`worker.arms.TUNERS`). Static typing sees the arms' common base.
if TYPE_CHECKING:
    ArmSpec = ArmSpecBase
else:
    ArmSpec = Annotated[
        functools.reduce(
            operator.or_, (Annotated[t.arm_spec(), Tag(name)] for name, t in TUNERS.items())
        ),
        Discriminator(_tuner_of),
        WrapValidator(_without_tag),
    ]


class Budget(Strict):
    """The same for every arm."""

    trials_per_arm: int = Field(16, ge=1, le=MAX_TRIALS_PER_ARM)
    epochs: int = Field(10, ge=1, le=MAX_EPOCHS)
    steps_per_epoch: int | None = Field(
        None, ge=1, le=MAX_STEPS_PER_EPOCH, description="default: one pass over the train split"
    )
    final_seeds: int = Field(5, ge=1, le=MAX_FINAL_SEEDS)


class _Named(Strict):
    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data


class SamplerSpec(_Named):
    """Optuna sampler: `"tpe"` or `{"name": "tpe", "n_startup_trials": 8}`."""

    name: Literal["random", "grid", "tpe", "cmaes", "gp"] = "tpe"
    n_startup_trials: int | None = Field(None, ge=0, le=MAX_TRIALS_PER_ARM)

    @field_validator("name")
    @classmethod
    def _installed(cls, value: str, info: ValidationInfo) -> str:
        import importlib.util

        if trusted(info):
            return value
        if value == "cmaes" and importlib.util.find_spec("cmaes") is None:
            raise spec_error("'cmaes' needs the Python package cmaes, which is not installed")
        return value


class PrunerSpec(_Named):
    """Optuna pruner over per-epoch validation values: `"median"` or an object."""

    name: Literal["none", "median", "successive_halving", "hyperband"] = "median"
    n_startup_trials: int = Field(4, ge=0, le=MAX_TRIALS_PER_ARM, description="median")
    n_warmup_epochs: int = Field(1, ge=0, le=MAX_EPOCHS, description="median")
    min_epochs: int = Field(1, ge=1, le=MAX_EPOCHS, description="successive_halving, hyperband")
    reduction_factor: int = Field(3, ge=2, le=10, description="successive_halving, hyperband")


class Objective(Strict):
    """What the sweep optimises, and how results are judged."""

    metric: Literal["val_accuracy", "val_loss"] = Field(
        "val_accuracy", description="val_loss for a regression task (its default there)"
    )
    direction: Literal["maximize", "minimize"] | None = Field(None, description="from metric")
    divergence_factor: float = Field(
        10.0,
        gt=1,
        le=1e6,
        description="diverged when train loss > factor × the chance-level loss (ln(classes); "
        "regression: the targets' mean square)",
    )
    target: float | None = Field(None, description="for steps/time to target; default relative")
    target_fraction: float = Field(0.95, gt=0, le=1, description="default target vs best arm")
    band_tolerance: float = Field(0.05, ge=0, lt=1, description="rate band: within this of best")

    @model_validator(mode="after")
    def _direction(self) -> Objective:
        if "metric" not in self.model_fields_set and self.direction == "minimize":
            self.metric = "val_loss"  # the metric to minimise that every task reports
        natural: Literal["maximize", "minimize"] = (
            "maximize" if self.metric == "val_accuracy" else "minimize"
        )
        if self.direction is None:
            self.direction = natural
        elif self.direction != natural:
            raise spec_error(f"{self.metric} is to {natural}, got direction {self.direction!r}")
        return self

    @property
    def maximize(self) -> bool:
        return self.direction == "maximize"


MAX_COHORT_SIZE = 64  # `worker.cohort`: members of one batched model


class Resources(Strict):
    """Ray resources per trial and how many trials run at once."""

    cpus_per_trial: float = Field(1.0, gt=0, le=256)
    gpus_per_trial: float = Field(0.0, ge=0, le=16, description="fractions pack trials on a GPU")
    max_concurrent_trials: int = Field(4, ge=1, le=MAX_CONCURRENT_TRIALS)
    max_retries: int = Field(2, ge=0, le=MAX_RETRIES, description="per failed trial")
    trial_timeout_s: float | None = Field(
        None, gt=0, le=MAX_TRIAL_TIMEOUT_S,
        description="per trial; a cohort's task may take cohort size times as long",
    )  # fmt: skip
    device: Literal["auto", "cpu", "cuda"] = "auto"
    fresh_process: bool | None = Field(
        None, description="one process per trial (default: when trials use GPUs)"
    )
    cohort_size: Literal["auto"] | int = Field(
        "auto",
        description=f"trials trained together as one batched model in one task, 1 to "
        f"{MAX_COHORT_SIZE} ('auto': by model size and device; 1: one trial per task)",
    )

    @field_validator("cohort_size", mode="before")
    @classmethod
    def _cohort_size(cls, value: Any) -> Any:
        if value == "auto" and isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_COHORT_SIZE:
            return value
        raise spec_error(
            f"must be 'auto' or a whole number from 1 to {MAX_COHORT_SIZE} "
            f"(1: one trial per task), got {value!r}"
        )

    @model_validator(mode="after")
    def _gpus(self) -> Resources:
        if self.gpus_per_trial > 1 and self.gpus_per_trial != int(self.gpus_per_trial):
            raise spec_error(f"gpus_per_trial above 1 must be whole, got {self.gpus_per_trial}")
        if self.gpus_per_trial > 0 and self.device == "cpu":
            raise spec_error("device 'cpu' with gpus_per_trial > 0 reserves GPUs it never uses")
        return self


_EXAMPLE: dict[str, Any] = {
    "name": "mnist1d-mlp-lr",
    "task": "mnist1d-mlp",
    "arms": [
        {"optimizer": "sgd", "fixed": {"momentum": 0.9}},
        {"optimizer": "adam"},
        {"optimizer": "sgd", "model": {"transformed": True}},
    ],
    "search_space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 24, "epochs": 20, "final_seeds": 3},
    "sampler": "tpe",
    "pruner": "median",
    "objective": {"metric": "val_accuracy", "direction": "maximize"},
    "resources": {"gpus_per_trial": 0.25, "max_concurrent_trials": 8},
}


def _default_search_space() -> dict[str, SearchDimension]:
    return {"lr": SearchDimension(low=1e-4, high=1.0, log=True)}


class StudySpec(Strict):
    """A learning-rate scheme comparison on one task (see the module docstring)."""

    model_config = ConfigDict(**MODEL_CONFIG, json_schema_extra={"examples": [_EXAMPLE]})

    version: int = Field(
        SPEC_VERSION, ge=1, le=SPEC_VERSION, description="the spec's format (stored specs migrate)"
    )
    name: str = Field(min_length=1, max_length=200)
    task: str = Field(
        description="an installed task: <dataset>-<model>, e.g. mnist1d-mlp, or a plugin's "
        "(GET /api/v1/tasks)",
        json_schema_extra=_list_tasks,
    )
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sweep seed; final seeds follow it")
    data: DataOptions = Field(default_factory=DataOptions)
    model: ModelOptions = Field(default_factory=ModelOptions)
    arms: list[ArmSpec] = Field(min_length=1, max_length=MAX_ARMS)
    search_space: dict[str, SearchDimension] = Field(default_factory=_default_search_space)
    budget: Budget = Field(default_factory=Budget)
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: PrunerSpec = Field(default_factory=PrunerSpec)
    objective: Objective = Field(default_factory=Objective)
    resources: Resources = Field(default_factory=Resources)

    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any, info: ValidationInfo) -> Any:
        if trusted(info):
            return data
        problems = raw_input_problems(data)
        if problems:
            raise ValidationError.from_exception_data(
                "StudySpec",
                [
                    InitErrorDetails(type=spec_error(message), loc=loc, input=None)
                    for loc, message in problems
                ],
            )
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str, info: ValidationInfo) -> str:
        if trusted(info):
            return value
        from worker.tasks import tasks

        if value not in tasks():
            raise spec_error(f"unknown task {value!r}; known: {', '.join(tasks())}")
        return value

    @model_validator(mode="after")
    def _cross_checks(self, info: ValidationInfo) -> StudySpec:
        if trusted(info) and all(arm.label is not None for arm in self.arms):
            return self  # stored after its checks: labels and the task's defaults are in it
        from worker.spec_checks import assign_labels, check_spec, pin_variants, task_defaults

        if not trusted(info):
            task_defaults(self)
        deadline = info.context.get("deadline") if info.context else None
        problems = [] if trusted(info) else check_spec(self, deadline)
        if problems:
            raise ValidationError.from_exception_data(
                "StudySpec",
                [
                    InitErrorDetails(type=spec_error(message), loc=loc, input=value)
                    for loc, message, value in problems
                ],
            )
        if not trusted(info):
            pin_variants(self)
        assign_labels(self)
        return self

    @classmethod
    def from_stored(cls, data: dict[str, Any]) -> StudySpec:
        """A spec read back from the database (or a study's stored copy): migrated to
        `SPEC_VERSION` and loaded as trusted data. The field types and bounds still apply, but
        the checks that depend on this machine (`trusted`) are not re-run: a study submitted
        on one machine stays readable on another, and after a package is removed."""
        data = dict(data)
        version = data.get("version", 1)
        if not isinstance(version, int) or not 1 <= version <= SPEC_VERSION:
            known = f"known: 1 to {SPEC_VERSION}"
            raise ValueError(f"version: unknown spec version {version!r}; {known}")
        for step in range(version, SPEC_VERSION):
            data = _MIGRATIONS[step](data)
        data["version"] = SPEC_VERSION
        data = _pin_stored_variants(data)
        return cls.model_validate(data, context={"stored": True})

    def arm_model(self, arm: ArmSpec) -> ModelOptions:
        """The arm's effective model options: the study's, updated by the arm's overrides."""
        return self.model.model_copy(update=arm.model.model_dump(exclude_none=True))

    def arm_search_space(self, arm: ArmSpec) -> dict[str, SearchDimension]:
        """The arm's effective search space: the study's, with the arm's entries replacing, and
        `"auto"` ranges resolved for the arm's scheme."""
        space = {**self.search_space, **(arm.own_search_space() or {})}
        return {name: dim.for_scheme(arm.optimizer, name) for name, dim in space.items()}

    def arm_schedule(self, arm: ArmSpec) -> ScheduleSpec:
        """The arm's schedule as given (the constant rate when it has none); swept fields are
        filled in per trial (`worker.spec_schedule.split_params`)."""
        return arm.own_schedule() or ScheduleSpec()

    @property
    def labels(self) -> list[str]:
        return [str(arm.label) for arm in self.arms]

    def steps_per_epoch(self) -> int:
        """`budget.steps_per_epoch`, else one pass over the training split (as the runner)."""
        if self.budget.steps_per_epoch is not None:
            return self.budget.steps_per_epoch
        return max(1, _train_examples(self.task, self.data) // self.data.batch_size)

    def estimated_steps(self) -> int:
        """Optimizer steps the whole study may take: per arm, (trials + final seeds) runs of
        epochs × steps per epoch (a hypergradient arm's runs are its `steps` long)."""
        runs = self.budget.trials_per_arm + self.budget.final_seeds
        default = self.budget.epochs * self.steps_per_epoch()
        return sum(runs * (arm.run_steps(self.budget) or default) for arm in self.arms)


# `_MIGRATIONS[v]` turns a stored spec of version v into one of version v + 1 (none yet: a spec
# without `version` is version 1, the first format).
_MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


# The defaults of the pinned options (`optim.registry.Hyperparameter.pinned`) before they were
# pinned: a study submitted since then states them in its arms (`worker.spec_checks.
# pin_variants`), so a stored Optuna arm without one was submitted when this was its default.
_DEFAULTS_BEFORE_PINNING: dict[str, dict[str, bool]] = {
    "bmp": {"propagate": True, "mean_over_positions": False},
}


def _pin_stored_variants(data: dict[str, Any]) -> dict[str, Any]:
    """A stored spec with its arms' unstated pinned options filled in at the defaults of their
    day (above): the scheme's default has changed since, and what a stored arm trained with,
    its label and its leaderboard setting must not change with it."""
    arms = data.get("arms")
    if not isinstance(arms, list):
        return data
    study_space = data.get("search_space")
    if not isinstance(study_space, dict):
        study_space = _default_search_space()
    searched_by_study = set(study_space)
    pinned = []
    for arm in arms:
        scheme = arm.get("optimizer") if isinstance(arm, dict) else None
        before = _DEFAULTS_BEFORE_PINNING.get(scheme) if isinstance(scheme, str) else None
        if not before or arm.get("tuner", "optuna") != "optuna":
            pinned.append(arm)
            continue
        fixed = dict(arm.get("fixed") or {})
        searched = searched_by_study | set(arm.get("search_space") or {})
        for name, value in before.items():
            if name not in fixed and name not in searched:
                fixed[name] = value
        pinned.append({**arm, "fixed": fixed})
    return {**data, "arms": pinned}


def _train_examples(task: str, data: DataOptions) -> int:
    """Examples in the training split, as `worker.tasks.data` will cut it from the task's
    training pool (its `DataShape`)."""
    from worker.tasks import get_task

    shape = get_task(task).shape(data.model_dump())
    pool = shape.train_pool
    n_val = 0 if shape.own_validation else data.n_val or max(1, round(data.val_fraction * pool))
    train = max(1, pool - n_val)
    return min(train, data.n_train) if data.n_train else train


def _string_problem(text: str) -> str | None:
    if "\x00" in text:
        return "must not contain a NUL byte (\\u0000)"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode: it contains a lone surrogate (\\ud800-\\udfff)"
    return None


MAX_JSON_DEPTH = 32  # a spec nests 6 deep (arms.0.search_space.lr.values.0); JSON deeper is refused


def raw_input_problems(
    data: Any, loc: tuple[str | int, ...] = ()
) -> list[tuple[tuple[str | int, ...], str]]:
    """`(loc, message)` for every string or key in parsed JSON that no database can store (NUL
    bytes, lone surrogates), every non-finite number, and any container nested deeper than
    `MAX_JSON_DEPTH` (reported once, at the first one, without looking inside); a key's own
    problem is reported at the key's location, written with its bad characters escaped. It
    walks with a stack of its own, so no depth of nesting can exhaust Python's."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, loc)]
    too_deep = False
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            if (problem := _string_problem(item)) is not None:
                problems.append((where, problem))
        elif isinstance(item, float):
            if not math.isfinite(item):
                problems.append((where, f"must be a finite number, got {item!r}"))
        elif isinstance(item, dict | list | tuple) and len(where) - len(loc) >= MAX_JSON_DEPTH:
            if not too_deep:
                problems.append((where, f"nested deeper than {MAX_JSON_DEPTH} levels"))
                too_deep = True
        elif isinstance(item, dict):
            children: list[tuple[Any, tuple[str | int, ...]]] = []
            for key, value in item.items():
                name = str(key)
                if (problem := _string_problem(name)) is not None:
                    escaped = (
                        name.encode("utf-8", "backslashreplace").decode().replace("\x00", "\\x00")
                    )
                    problems.append(((*where, escaped), f"key {problem}"))
                    continue
                children.append((value, (*where, name)))
            stack.extend(reversed(children))
        elif isinstance(item, list | tuple):
            stack.extend(reversed([(value, (*where, i)) for i, value in enumerate(item)]))
    return problems


def format_errors(error: ValidationError) -> list[str]:
    """One line per problem: `arms.1.optimizer: unknown scheme 'foo'; known: …`."""
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "spec"
        message = item["msg"]
        value = item.get("input")
        if item["type"] not in {"spec", "missing"} and isinstance(value, int | float | str):
            message = f"{message} (got {value!r})"
        lines.append(f"{where}: {message}")
    return lines


def warm_up_checks() -> None:
    """Validate one small spec now. A process's first validation imports the cross-field checks
    and has PyTorch build an optimizer, whose first construction imports `torch._dynamo`: 1.6 s
    on an idle 2-core machine. A service calls this before it serves, so that its first submit
    does not pay for it while every concurrent submit waits on the same imports."""
    spec = {"name": "warm-up", "task": "digits-mlp", "arms": [{"optimizer": "sgd"}]}
    StudySpec.model_validate(spec)
