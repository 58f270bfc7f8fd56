"""The checks of a study spec that span fields: arms against their schemes' hyperparameters,
the data and model options against the task, model sizes against the limits, each scheme
against the model it trains (built on the meta device, as a trial would build it); arm labels.

Each check returns `(loc, message, value)` problems so that `StudySpec` reports them all at once,
each under its own field path.
"""

from __future__ import annotations

import functools
import importlib.util
import math
from typing import TYPE_CHECKING, Any

import optim
from worker.tasks import get_task
from worker.tasks.models import build_model, count_parameters

if TYPE_CHECKING:
    from worker.spec import ArmSpec, ModelOptions, SearchDimension, StudySpec

__all__ = ["Problem", "assign_labels", "check_spec"]

Problem = tuple[tuple[str | int, ...], str, Any]


def _strip(scheme: str, name: str, message: str) -> str:
    """optim's messages start with "<scheme>: <name>: "; the field path already says that."""
    for prefix in (f"{scheme}: {name}: ", f"{scheme}: "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _check_value(scheme: str, name: str, value: Any) -> str | None:
    try:
        optim.SCHEMES[scheme].hyperparameter(name).check(scheme, value)
    except ValueError as exc:
        return _strip(scheme, name, str(exc))
    return None


def _known(scheme: str) -> str:
    return ", ".join(h.name for h in optim.SCHEMES[scheme].hyperparameters)


def _check_dimension(scheme: str, name: str, dim: SearchDimension) -> str | None:
    hp = optim.SCHEMES[scheme].hyperparameter(name)
    if dim.values is not None:
        for value in dim.values:
            problem = _check_value(scheme, name, value)
            if problem:
                return f"value {value!r}: {problem}"
        return None
    if hp.type == "bool":
        return f"{name} of {scheme} is true/false; search it with values: [true, false]"
    for bound in (dim.low, dim.high):
        if hp.type == "int" and bound is not None and bound != int(bound):
            return f"{name} of {scheme} is an integer; bounds must be whole, got {bound:g}"
        problem = _check_value(scheme, name, bound)
        if problem:
            return f"{problem} (valid range of {name} for {scheme}: {hp.low:g} to {hp.high:g})"
    return None


def _check_arm(spec: StudySpec, index: int, arm: ArmSpec) -> list[Problem]:
    where: tuple[str | int, ...] = ("arms", index)
    if arm.tuner == "hypergradient":
        return _check_hypergradient(spec, index, arm)
    if arm.hypergradient is not None:
        message = "options of the hypergradient tuner; this arm's tuner is 'optuna'"
        return [((*where, "hypergradient"), message, None)]
    problems: list[Problem] = []
    scheme = arm.optimizer
    hyperparameters = {h.name for h in optim.SCHEMES[scheme].hyperparameters}
    for name, value in arm.fixed.items():
        if name not in hyperparameters:
            message = f"{scheme} has no hyperparameter {name!r}; known: {_known(scheme)}"
            problems.append(((*where, "fixed", name), message, value))
        elif (problem := _check_value(scheme, name, value)) is not None:
            problems.append(((*where, "fixed", name), problem, value))
    space = spec.arm_search_space(arm)
    if not space:
        problems.append(((*where, "search_space"), "nothing to search; give a search_space", None))
    own = arm.search_space or {}
    for name, dim in space.items():
        loc = (*where, "search_space", name) if name in own else ("search_space", name)
        if name not in hyperparameters:
            message = (
                f"{name!r} is not a hyperparameter of {scheme} (arm {index}); "
                f"known: {_known(scheme)}"
            )
            problems.append((loc, message, None))
        elif name in arm.fixed:
            message = f"{name!r} is both fixed and searched; keep one"
            problems.append(((*where, "fixed", name), message, arm.fixed[name]))
        elif (problem := _check_dimension(scheme, name, dim)) is not None:
            problems.append((loc, problem, None))
    return problems


_HYPERGRAD_DATASETS = ("mnist1d", "digits", "synthetic")


def _hypergradient_model(spec: StudySpec, index: int, arm: ArmSpec) -> Problem | None:
    """The model and data a hypergradient arm needs: optim.hypergrad's ReLU MLP on vectors."""
    from worker._hypergrad_run import mlp_layer_sizes, mlp_parameter_count
    from worker.spec import MAX_HYPERGRAD_DEPTH, MAX_HYPERGRAD_PARAMETERS, MAX_HYPERGRAD_WIDTH

    task, model = get_task(spec.task), spec.arm_model(arm)
    tuner: tuple[str | int, ...] = ("arms", index, "tuner")
    dataset = task.dataset.name
    vectors = dataset in _HYPERGRAD_DATASETS and (
        dataset != "synthetic" or len(task.input_shape(spec.data.model_dump())) == 1
    )
    if task.model.name != "mlp" or not vectors:
        got = spec.task
        if dataset == "synthetic":
            got += f" with input_shape {list(task.input_shape(spec.data.model_dump()))}"
        message = (
            "the hypergradient tuner trains an mlp on feature vectors (tasks mnist1d-mlp, "
            f"digits-mlp, synthetic-mlp with a one-dimensional data.input_shape); got {got}"
        )
        return (tuner, message, arm.tuner)
    if model.transformed or model.activation != "relu":
        message = (
            "the hypergradient tuner's mlp is ReLU and not transformed; got activation "
            f"{model.activation!r}, transformed {str(model.transformed).lower()}"
        )
        return (("arms", index, "model"), message, None)
    sizes = mlp_layer_sizes(spec.task, spec.data.model_dump(), model.model_dump())
    width, depth = max(sizes[1:-1]), len(sizes) - 2
    n = mlp_parameter_count(sizes)
    if width > MAX_HYPERGRAD_WIDTH or depth > MAX_HYPERGRAD_DEPTH or n > MAX_HYPERGRAD_PARAMETERS:
        message = (
            f"width {width}, depth {depth}, {n:,} parameters; the hypergradient tuner takes "
            f"width <= {MAX_HYPERGRAD_WIDTH}, depth <= {MAX_HYPERGRAD_DEPTH} and at most "
            f"{MAX_HYPERGRAD_PARAMETERS:,} parameters (set the model's width and depth)"
        )
        return (("arms", index, "model"), message, None)
    return None


def _check_hypergradient(spec: StudySpec, index: int, arm: ArmSpec) -> list[Problem]:
    """A hypergradient arm: sgd on optim.hypergrad's MLP, judged by val_loss, bounded size."""
    where: tuple[str | int, ...] = ("arms", index)
    problems: list[Problem] = []
    if arm.optimizer != "sgd":
        message = (
            "the hypergradient tuner trains with SGD with momentum (reversibly); "
            f"set optimizer 'sgd', got {arm.optimizer!r}"
        )
        problems.append(((*where, "optimizer"), message, arm.optimizer))
    if spec.objective.metric != "val_loss":
        message = (
            "the hypergradient tuner minimises the validation cross-entropy and measures no "
            "accuracy of its reversible runs; set objective.metric 'val_loss' "
            f"(got {spec.objective.metric!r})"
        )
        problems.append(((*where, "tuner"), message, arm.tuner))
    if arm.fixed:
        message = (
            "a hypergradient arm takes its starting values from its hypergradient options "
            f"(lr, momentum, init_scale, l2), not fixed; got {', '.join(arm.fixed)}"
        )
        problems.append(((*where, "fixed"), message, None))
    if arm.search_space is not None:
        message = "a hypergradient arm learns its schedule; it searches nothing (drop this)"
        problems.append(((*where, "search_space"), message, None))
    if (problem := _hypergradient_model(spec, index, arm)) is not None:
        problems.append(problem)
    steps = spec.arm_hypergradient_steps(arm)
    options = arm.hypergradient_options
    at = (*where, "hypergradient", "steps")
    if steps is None:
        message = (
            "give steps (T, the SGD steps of one training run), or budget.steps_per_epoch so "
            "that it defaults to budget.epochs × steps_per_epoch like the other arms"
        )
        problems.append((at, message, None))
    else:
        from worker.spec import MAX_HYPERGRAD_STEPS

        if steps > MAX_HYPERGRAD_STEPS:
            message = (
                f"budget.epochs × budget.steps_per_epoch = {steps}; at most "
                f"{MAX_HYPERGRAD_STEPS}: give a smaller steps"
            )
            problems.append((at, message, None))
        elif options.blocks > steps:
            message = f"blocks {options.blocks} > steps {steps}; at most one block per step"
            problems.append(((*where, "hypergradient", "blocks"), message, options.blocks))
    batch = options.batch_size or spec.data.batch_size
    if spec.data.n_train is not None and batch > spec.data.n_train:
        message = f"batch_size {batch} is larger than data.n_train {spec.data.n_train}"
        problems.append(((*where, "hypergradient", "batch_size"), message, batch))
    return problems


def _check_model(spec: StudySpec, options: ModelOptions) -> str | None:
    task = get_task(spec.task)
    model = task.model.name
    if options.transformed and model != "mlp":
        return f"transformed: only the mlp model has a transformed variant, not {model}"
    if options.transformed and importlib.util.find_spec("optim.transformed") is None:
        return "transformed: needs optim.transformed, which this installation lacks"
    if options.activation != "relu" and model != "mlp":
        return f"activation: only the mlp model takes an activation, not {model}"
    if options.depth is not None and task.model.default_depth is None:
        return f"depth: {model} has a fixed depth (the VGG13 shape); set width only"
    data = spec.data.model_dump()
    if task.model.needs_image and len(task.input_shape(data)) != 3:
        return None  # reported under data.input_shape
    try:
        n = count_parameters(
            model,
            task.input_shape(data),
            task.n_classes(data),
            width=options.width,
            depth=options.depth,
            activation=options.activation,
            transformed=options.transformed,
        )
    except ImportError as exc:
        return f"{model} cannot be built here: {exc}"
    from worker.spec import MAX_PARAMETERS

    if n > MAX_PARAMETERS:
        return f"{n:,} parameters; at most {MAX_PARAMETERS:,} (reduce width or depth)"
    return None


@functools.lru_cache(maxsize=512)
def _build_error(
    scheme: str,
    hyperparameters: tuple[tuple[str, Any], ...],
    model: str,
    input_shape: tuple[int, ...],
    n_classes: int,
    options: tuple[int | None, int | None, str, bool],
) -> str | None:
    """Why `optim.build` refuses this scheme on this model, or None. The model is the one a
    trial builds (same shape and sizes), made on the meta device: nothing is allocated."""
    import torch

    width, depth, activation, transformed = options
    with torch.device("meta"):
        net = build_model(
            model,
            input_shape,
            n_classes,
            width=width,
            depth=depth,
            activation=activation,
            transformed=transformed,
        )
        try:
            optim.build(scheme, net, **dict(hyperparameters))
        except ValueError as exc:  # optim's errors: "<scheme>: <what>"
            return _strip(scheme, "", str(exc))
    return None


def _probe_values(arm: ArmSpec, space: dict[str, SearchDimension]) -> dict[str, Any]:
    """The arm's fixed values, and each searched hyperparameter at its top (a range's high,
    a list's last value), where a combination like nesterov without momentum shows."""
    values: dict[str, Any] = dict(arm.fixed)
    for name, dim in space.items():
        if name not in values:
            values[name] = dim.values[-1] if dim.values is not None else dim.high
    return values


def _check_build(spec: StudySpec, index: int, arm: ArmSpec) -> Problem | None:
    """An optuna arm whose scheme cannot be built on the task's model (bmp_exact on a
    convolutional or residual network), or not with its fixed values: refused now rather
    than failing every trial."""
    task, options = get_task(spec.task), spec.arm_model(arm)
    data = spec.data.model_dump()
    model = (
        task.model.name,
        task.input_shape(data),
        task.n_classes(data),
        (options.width, options.depth, options.activation, options.transformed),
    )
    reason = _build_error(arm.optimizer, (), *model)
    if reason is not None:
        kind = f"transformed {task.model.name}" if options.transformed else task.model.name
        message = f"{arm.optimizer} cannot train the {kind} of {spec.task}: {reason}"
        return (("arms", index, "optimizer"), message, arm.optimizer)
    values = _probe_values(arm, spec.arm_search_space(arm))
    reason = _build_error(arm.optimizer, tuple(sorted(values.items())), *model)
    if reason is not None:
        return (("arms", index, "fixed" if arm.fixed else "search_space"), reason, None)
    return None


def _check_data(spec: StudySpec) -> list[Problem]:
    from worker.spec import MAX_SYNTHETIC_VALUES

    task = get_task(spec.task)
    data, dataset = spec.data, task.dataset.name
    problems: list[Problem] = []
    if dataset != "synthetic":
        for name in ("input_shape", "n_classes", "n_examples"):
            if getattr(data, name) is not None:
                message = f"only the synthetic dataset takes {name}, not {dataset}"
                problems.append((("data", name), message, getattr(data, name)))
    else:
        shape = task.input_shape(data.model_dump())
        if task.model.needs_image and len(shape) != 3:
            message = f"{task.model.name} needs images: input_shape [channels, height, width]"
            problems.append((("data", "input_shape"), message, None))
        size = (data.n_examples or 4096) * math.prod(shape)
        if size > MAX_SYNTHETIC_VALUES:
            message = f"{size:,} input values; at most {MAX_SYNTHETIC_VALUES:,}"
            problems.append((("data", "n_examples"), message, data.n_examples))
    if data.data_dir is not None and not dataset.startswith("cifar"):
        problems.append((("data", "data_dir"), f"{dataset} reads no files", data.data_dir))
    if data.n_train is not None and data.n_train < data.batch_size:
        message = f"batch_size {data.batch_size} is larger than n_train {data.n_train}"
        problems.append((("data", "batch_size"), message, data.batch_size))
    return problems


def check_spec(spec: StudySpec) -> list[Problem]:
    """Every cross-field problem of `spec`, each with its field path."""
    problems = _check_data(spec)
    for index, arm in enumerate(spec.arms):
        problems += _check_arm(spec, index, arm)
    seen: set[str] = set()
    model_problem = _check_model(spec, spec.model)
    if model_problem:
        problems.append((("model",), model_problem, None))
        seen.add(model_problem)
    for index, arm in enumerate(spec.arms):
        if arm.model.model_dump(exclude_none=True):
            problem = _check_model(spec, spec.arm_model(arm))
            if problem and problem not in seen:
                problems.append((("arms", index, "model"), problem, None))
    if not problems:  # the scheme on the model, once the arms and the models are valid
        for index, arm in enumerate(spec.arms):
            if arm.tuner == "optuna" and (refused := _check_build(spec, index, arm)):
                problems.append(refused)
    labels: dict[str, int] = {}
    for index, arm in enumerate(spec.arms):
        if arm.label is not None:
            if arm.label in labels:
                message = (
                    f"label {arm.label!r} is also arms.{labels[arm.label]}'s; labels are unique"
                )
                problems.append((("arms", index, "label"), message, arm.label))
            labels.setdefault(arm.label, index)
            if refused := _check_label(spec, index, arm):
                problems.append(refused)
    return problems


_VARIANTS = {"bmp-local", "bmp-propagate-searched"}  # bmp arms that never pool with bmp


def _scheme_part(spec: StudySpec, arm: ArmSpec) -> str:
    """The scheme, or the bmp variant, that a label's first part names: arms with a different
    one must not share a label (leaderboards pool arms by label and scheme)."""
    if arm.optimizer == "bmp" and "propagate" in spec.arm_search_space(arm):
        return "bmp-propagate-searched"
    if arm.optimizer == "bmp" and arm.fixed.get("propagate") is False:
        return "bmp-local"
    return arm.optimizer


def _check_label(spec: StudySpec, index: int, arm: ArmSpec) -> Problem | None:
    """A user label that names a scheme (or bmp variant) must name the arm's own."""
    assert arm.label is not None
    named, own = arm.label.split("+")[0], _scheme_part(spec, arm)
    if (named in optim.SCHEMES or named in _VARIANTS) and named != own:
        message = f"label {arm.label!r} names {named!r}, but this arm is {own!r}: choose another"
        return (("arms", index, "label"), message, arm.label)
    return None


def _derived_label(spec: StudySpec, arm: ArmSpec) -> str:
    parts = [_scheme_part(spec, arm)]
    for name, value in arm.model.model_dump(exclude_none=True).items():
        if getattr(spec.model, name) == value:
            continue
        if isinstance(value, bool):
            parts.append(name if value else f"no-{name}")
        else:
            parts.append(f"{name}={value}")
    return "+".join(parts)[:64]


def assign_labels(spec: StudySpec) -> None:
    """Give every unlabelled arm its derived label, made unique with -2, -3, … in order."""
    taken = {arm.label for arm in spec.arms if arm.label is not None}
    for arm in spec.arms:
        if arm.label is not None:
            continue
        base = _derived_label(spec, arm)
        label, n = base, 1
        while label in taken:
            n += 1
            label = f"{base[:60]}-{n}"
        arm.label = label
        taken.add(label)
