"""The study spec: valid examples pass, each mistake is reported under its field path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from worker import spec_base as limits
from worker.arms.hypergradient.spec import HypergradientArmSpec
from worker.arms.optuna.spec import OptunaArmSpec
from worker.spec import SPEC_VERSION, StudySpec, format_errors

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))


def _spec(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "t",
        "task": "mnist1d-mlp",
        "arms": [{"optimizer": "sgd"}, {"optimizer": "adam"}],
    }
    base.update(changes)
    return base


def _errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(data)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_spec_is_valid(path: Path, examples_ready: Path) -> None:
    spec = StudySpec.model_validate(json.loads(path.read_text()))
    assert len(set(spec.labels)) == len(spec.arms)


def test_there_are_example_specs() -> None:
    assert {p.name for p in EXAMPLES} >= {"quick.json", "mnist1d-mlp-lr.json"}


def test_defaults_fill_a_minimal_spec() -> None:
    spec = StudySpec.model_validate(_spec())
    assert spec.objective.direction == "maximize"
    assert set(spec.search_space) == {"lr"}
    assert spec.labels == ["sgd", "adam"]


def test_unknown_scheme_names_the_arm_and_lists_known_schemes() -> None:
    errors = _errors(_spec(arms=[{"optimizer": "sgd"}, {"optimizer": "foo"}]))
    assert errors["arms.1.optimizer"].startswith("unknown scheme 'foo'; known: sgd, adam")


def test_unknown_task_lists_known_tasks() -> None:
    errors = _errors(_spec(task="mnist1d-vgg"))
    assert "unknown task 'mnist1d-vgg'" in errors["task"]
    assert "mnist1d-mlp" in errors["task"]


def test_rate_range_outside_the_schemes_range_is_rejected() -> None:
    errors = _errors(_spec(search_space={"lr": {"low": 1e-9, "high": 1.0, "log": True}}))
    assert set(errors) == {"search_space.lr"}
    assert "must be >= 1e-07" in errors["search_space.lr"]


def test_arm_search_space_replaces_the_studys_entry() -> None:
    arms = [{"optimizer": "sgd", "search_space": {"lr": {"low": 0.01, "high": 0.1}}}]
    spec = StudySpec.model_validate(_spec(arms=arms))
    lr = spec.arm_search_space(spec.arms[0])["lr"]
    assert (lr.low, lr.high, lr.log) == (0.01, 0.1, False)


def test_fixed_hyperparameters_are_checked_against_the_scheme() -> None:
    arms = [{"optimizer": "sgd", "fixed": {"momentum": -1, "beta1": 0.9, "lr": 0.1}}]
    errors = _errors(_spec(arms=arms))
    assert errors["arms.0.fixed.momentum"] == "must be >= 0, got -1"
    assert errors["arms.0.fixed.beta1"].startswith("sgd has no hyperparameter 'beta1'; known: lr")
    assert errors["arms.0.fixed.lr"] == "'lr' is both fixed and searched; keep one"


def test_searching_a_hyperparameter_one_arm_lacks_names_that_arm() -> None:
    space = {"lr": {"low": 0.001, "high": 1, "log": True}, "momentum": {"low": 0, "high": 0.9}}
    errors = _errors(_spec(search_space=space))
    assert "not a hyperparameter of adam (arm 1)" in errors["search_space.momentum"]


def test_budget_over_the_hard_limit_is_rejected_with_the_limit() -> None:
    too_many = limits.MAX_TRIALS_PER_ARM + 1
    errors = _errors(_spec(budget={"trials_per_arm": too_many, "epochs": 0}))
    assert str(limits.MAX_TRIALS_PER_ARM) in errors["budget.trials_per_arm"]
    assert "budget.epochs" in errors


def test_too_many_arms_is_rejected() -> None:
    arms = [{"optimizer": "sgd"}] * (limits.MAX_ARMS + 1)
    assert "arms" in _errors(_spec(arms=arms))


def test_model_over_the_parameter_limit_is_rejected() -> None:
    errors = _errors(_spec(model={"width": 4096, "depth": 64}))
    assert "at most 50,000,000" in errors["model"]


def test_model_options_must_fit_the_model() -> None:
    """Each model declares its options (worker.tasks.models): another is refused at its path."""
    errors = _errors(_spec(task="digits-cnn", model={"transformed": True, "width": 8}))
    assert errors["model.transformed"] == (
        "the cnn model of digits-cnn has no option 'transformed'; its options: width, depth"
    )
    errors = _errors(_spec(task="digits-vgg", model={"depth": 3}))
    assert errors["model.depth"].endswith("has no option 'depth'; its options: width")
    errors = _errors(_spec(arms=[{"optimizer": "sgd", "model": {"gate": "silu"}}]))
    assert "has no option 'gate'" in errors["arms.0.model.gate"]


def test_an_objective_to_minimise_without_a_metric_is_val_loss() -> None:
    spec = StudySpec.model_validate(_spec(objective={"direction": "minimize"}))
    assert (spec.objective.metric, spec.objective.direction) == ("val_loss", "minimize")


def test_synthetic_options_belong_to_the_synthetic_dataset() -> None:
    errors = _errors(_spec(data={"input_shape": [10]}))
    assert errors["data.input_shape"] == "mnist1d takes no input_shape (its data options: none)"
    errors = _errors(_spec(task="synthetic-cnn", data={"input_shape": [10]}))
    assert "needs images" in errors["data.input_shape"]


def test_hypergradient_tuner_needs_the_loss_it_descends() -> None:
    errors = _errors(_spec(arms=[{"optimizer": "sgd", "tuner": "hypergradient"}]))
    assert "objective.metric 'val_loss'" in errors["arms.0.tuner"]


# -- arms by tuner -----------------------------------------------------------------------------


def test_an_arm_without_a_tuner_is_an_optuna_arm() -> None:
    spec = StudySpec.model_validate(_spec(arms=[{"optimizer": "sgd", "fixed": {"momentum": 0.9}}]))
    (arm,) = spec.arms
    assert isinstance(arm, OptunaArmSpec)
    assert arm.tuner == "optuna" and arm.fixed == {"momentum": 0.9}


def test_a_hypergradient_arm_is_its_own_model_with_its_options() -> None:
    arm = {"optimizer": "sgd", "tuner": "hypergradient", "hypergradient": {"steps": 40}}
    spec = StudySpec.model_validate(
        _spec(arms=[{"optimizer": "sgd"}, arm], objective={"metric": "val_loss"})
    )
    optuna_arm, hypergradient_arm = spec.arms
    assert isinstance(optuna_arm, OptunaArmSpec)
    assert isinstance(hypergradient_arm, HypergradientArmSpec)
    assert hypergradient_arm.hypergradient_options.steps == 40
    assert hypergradient_arm.hypergradient_options.blocks == 10  # the default
    assert not hasattr(hypergradient_arm, "fixed")


def test_an_unknown_tuner_is_named_with_the_known_ones() -> None:
    errors = _errors(_spec(arms=[{"optimizer": "sgd"}, {"optimizer": "sgd", "tuner": "bohb"}]))
    assert errors == {"arms.1.tuner": "unknown tuner 'bohb'; known: optuna, hypergradient"}


def test_an_arm_reports_its_errors_at_its_own_fields_not_under_its_tuner() -> None:
    arms = [
        {"optimizer": "sgd", "fixed": {"momentum": 3.0}, "label": "!"},
        {"optimizer": "sgd", "tuner": "hypergradient", "hypergradient": {"steps": 0}},
        {"optimizer": "sgd", "hypergradient": {"steps": 10}},
    ]
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(_spec(arms=arms, objective={"metric": "val_loss"}))
    errors = {e["loc"]: e for e in info.value.errors()}
    assert set(errors) == {
        ("arms", 0, "label"),
        ("arms", 1, "hypergradient", "steps"),
        ("arms", 2, "hypergradient"),
    }
    assert errors[("arms", 0, "label")]["type"] == "string_pattern_mismatch"
    steps = errors[("arms", 1, "hypergradient", "steps")]
    assert steps["type"] == "greater_than_equal" and steps["ctx"] == {"ge": 1}
    assert "options of the hypergradient tuner" in errors[("arms", 2, "hypergradient")]["msg"]
    # once the fields are valid, the cross-field checks use the same paths
    errors_ = _errors(_spec(arms=[{"optimizer": "sgd", "fixed": {"momentum": 3.0}}]))
    assert errors_ == {"arms.0.fixed.momentum": "must be <= 0.999, got 3"}


def test_a_dump_has_every_tuners_fields_and_loads_back() -> None:
    """Stored specs (dumps of the one arm model arms had before) hold every tuner's fields,
    the other tuners' empty; a dump stays so, and loads back."""
    arms = [{"optimizer": "sgd"}, {"optimizer": "sgd", "tuner": "hypergradient"}]
    spec = StudySpec.model_validate(
        _spec(arms=arms, objective={"metric": "val_loss"}, budget={"steps_per_epoch": 5})
    )
    stored = spec.model_dump(mode="json")
    optuna_arm, hypergradient_arm = stored["arms"]
    every = {"optimizer", "label", "model", "tuner", "fixed", "search_space", "hypergradient"}
    assert set(optuna_arm) == set(hypergradient_arm) == every
    assert (optuna_arm["tuner"], optuna_arm["hypergradient"]) == ("optuna", None)
    assert (hypergradient_arm["fixed"], hypergradient_arm["search_space"]) == ({}, None)
    again = StudySpec.from_stored(stored)
    assert again.model_dump(mode="json") == stored
    assert StudySpec.model_validate(stored).model_dump(mode="json") == stored
    assert spec.arms[0].model_dump(exclude_none=True) == {
        "optimizer": "sgd",
        "label": "sgd",
        "model": {},
        "tuner": "optuna",
        "fixed": {},
    }


def test_direction_must_agree_with_the_metric() -> None:
    errors = _errors(_spec(objective={"metric": "val_loss", "direction": "maximize"}))
    assert errors["objective"] == "val_loss is to minimize, got direction 'maximize'"


def test_unknown_fields_are_rejected() -> None:
    assert "budget.trials" in _errors(_spec(budget={"trials": 3}))


def test_labels_are_derived_unique_and_survive_a_round_trip() -> None:
    arms = [
        {"optimizer": "sgd"},
        {"optimizer": "sgd", "fixed": {"momentum": 0.9}},
        {"optimizer": "sgd", "model": {"transformed": True}},
        {"optimizer": "adam", "label": "sgd-3"},
        {"optimizer": "sgd", "fixed": {"nesterov": True, "momentum": 0.5}},
    ]
    spec = StudySpec.model_validate(_spec(arms=arms))
    assert spec.labels == ["sgd", "sgd-2", "sgd+transformed", "sgd-3", "sgd-4"]
    again = StudySpec.model_validate(spec.model_dump(mode="json"))
    assert again.labels == spec.labels


def test_duplicate_labels_are_rejected() -> None:
    arms = [{"optimizer": "sgd", "label": "a"}, {"optimizer": "adam", "label": "a"}]
    assert "labels are unique" in _errors(_spec(arms=arms))["arms.1.label"]


def test_sampler_and_pruner_accept_a_name_or_an_object() -> None:
    spec = StudySpec.model_validate(_spec(sampler="random", pruner={"name": "hyperband"}))
    assert (spec.sampler.name, spec.pruner.name) == ("random", "hyperband")


def test_format_errors_gives_one_line_per_problem_with_its_path() -> None:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(_spec(arms=[{"optimizer": "foo"}], budget={"epochs": 5000}))
    lines = format_errors(info.value)
    assert len(lines) == 2
    assert any(line.startswith("arms.0.optimizer: unknown scheme 'foo'") for line in lines)
    assert any(line.startswith("budget.epochs: ") and "(got 5000)" in line for line in lines)


def test_the_json_schema_carries_an_example_that_validates() -> None:
    schema = StudySpec.model_json_schema()
    (example,) = schema["examples"]
    StudySpec.model_validate(example)
    arms = schema["properties"]["arms"]["items"]["oneOf"]
    assert arms == [
        {"$ref": "#/$defs/OptunaArmSpec"},
        {"$ref": "#/$defs/HypergradientArmSpec"},
    ]
    assert "sgd" in schema["$defs"]["OptunaArmSpec"]["properties"]["optimizer"]["enum"]


def test_bmp_variants_get_their_own_labels_and_no_label_can_pool_them() -> None:
    """Leaderboards pool arms by label and scheme: propagating bmp, bmp-local and a bmp arm that
    searches `propagate` must never share a label, whether derived or chosen. Labels name how
    an arm differs from the paper's form (propagating, sums over positions), whatever the
    defaults are: the default arm is `bmp-local-mean-positions`."""
    sums = {"mean_over_positions": False}
    arms = [
        {"optimizer": "bmp", "fixed": {"propagate": True, **sums}},
        {"optimizer": "bmp", "fixed": {"propagate": False, **sums}},
        {
            "optimizer": "bmp",
            "search_space": {"propagate": {"values": [True, False]}},
            "fixed": sums,
        },
        {"optimizer": "bmp"},
    ]
    spec = StudySpec.model_validate(_spec(arms=arms))
    assert spec.labels == ["bmp", "bmp-local", "bmp-propagate-searched", "bmp-local-mean-positions"]
    disguised = [{"optimizer": "bmp", "fixed": {"propagate": False, **sums}, "label": "bmp"}]
    assert "this arm is 'bmp-local'" in _errors(_spec(arms=disguised))["arms.0.label"]
    default_disguised = [{"optimizer": "bmp", "label": "bmp"}]
    error = _errors(_spec(arms=default_disguised))["arms.0.label"]
    assert "this arm is 'bmp-local-mean-positions'" in error
    wrong_scheme = [{"optimizer": "adam", "label": "sgd+fast"}]
    assert "this arm is 'adam'" in _errors(_spec(arms=wrong_scheme))["arms.0.label"]
    free = [{"optimizer": "bmp", "fixed": {"propagate": False}, "label": "mine"}]
    assert StudySpec.model_validate(_spec(arms=free)).labels == ["mine"]


def test_bmp_position_modes_get_their_own_labels() -> None:
    """`mean_over_positions` changes bmp's rates: an arm with it fixed true or searched never
    shares a label (and so a leaderboard row) with the sum mode, alone or with propagate."""
    mean = {"mean_over_positions": True}
    arms = [
        {"optimizer": "bmp", "fixed": {"propagate": True, "mean_over_positions": False}},
        {"optimizer": "bmp", "fixed": {"propagate": True, **mean}},
        {"optimizer": "bmp", "fixed": {"propagate": False, **mean}},
        {
            "optimizer": "bmp",
            "search_space": {"mean_over_positions": "auto"},
            "fixed": {"propagate": True},
        },
        {
            "optimizer": "bmp",
            "search_space": {"propagate": {"values": [True, False]}},
            "fixed": mean,
        },
    ]
    spec = StudySpec.model_validate(_spec(arms=arms))
    assert spec.labels == [
        "bmp",
        "bmp-mean-positions",
        "bmp-local-mean-positions",
        "bmp-positions-searched",
        "bmp-propagate-searched-mean-positions",
    ]
    disguised = [{"optimizer": "bmp", "fixed": {"propagate": True, **mean}, "label": "bmp-local"}]
    error = _errors(_spec(arms=disguised))["arms.0.label"]
    assert "this arm is 'bmp-mean-positions'" in error
    wrong = [{"optimizer": "bmp", "fixed": {"mean_over_positions": 1}}]
    assert "true or false" in _errors(_spec(arms=wrong))["arms.0.fixed.mean_over_positions"]


def test_a_bmp_arm_states_its_variant_so_a_later_default_cannot_change_it() -> None:
    """`propagate` and `mean_over_positions` decide which bmp an arm is: a spec that leaves
    them out gets today's defaults written into the arm at submit, and a spec stored before that
    (without them) reads back with the defaults of its day, so neither its training, its label
    nor its leaderboard setting follows a later change of default."""
    import optim

    defaults = {h.name: h.default for h in optim.scheme("bmp").hyperparameters if h.pinned}
    assert set(defaults) == {"propagate", "mean_over_positions"}
    arms = [
        {"optimizer": "bmp"},
        {"optimizer": "bmp", "search_space": {"propagate": {"values": [True, False]}}},
        {"optimizer": "sgd"},
    ]
    spec = StudySpec.model_validate(_spec(arms=arms))
    stored = spec.model_dump(mode="json")
    assert stored["arms"][0]["fixed"] == defaults
    assert stored["arms"][1]["fixed"] == {"mean_over_positions": defaults["mean_over_positions"]}
    assert stored["arms"][2]["fixed"] == {}
    assert StudySpec.from_stored(stored).model_dump(mode="json") == stored

    before_pinning = {  # as a study submitted before the options were pinned was stored
        **_spec(),
        "arms": [
            {"optimizer": "bmp", "label": "bmp", "fixed": {"momentum": 0.9}},
            {"optimizer": "bmp", "label": "bmp-local", "fixed": {"propagate": False}},
            {"optimizer": "sgd", "label": "sgd"},
        ],
    }
    read = StudySpec.from_stored(before_pinning)
    assert read.labels == ["bmp", "bmp-local", "sgd"]
    assert [arm.fixed_values() for arm in read.arms] == [
        {"momentum": 0.9, "propagate": True, "mean_over_positions": False},
        {"propagate": False, "mean_over_positions": False},
        {},
    ]


# -- stored specs ------------------------------------------------------------------------------


def test_a_stored_spec_without_a_version_is_version_one() -> None:
    stored = StudySpec.model_validate(_spec()).model_dump(mode="json")
    assert stored["version"] == SPEC_VERSION == 1
    del stored["version"]  # as stored before specs had versions
    spec = StudySpec.from_stored(stored)
    assert spec.version == 1 and spec.labels == ["sgd", "adam"]


def test_a_stored_spec_is_read_without_the_checks_of_this_machine(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    import optim

    stored = StudySpec.model_validate(_spec(sampler="random")).model_dump(mode="json")
    stored["sampler"] = {"name": "cmaes", "n_startup_trials": None}
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "cmaes" else find_spec(name)
    )
    monkeypatch.delitem(optim.SCHEMES, "adam")  # a scheme this installation no longer has
    errors = _errors(stored)
    assert "cmaes" in errors["sampler.name"] and "unknown scheme" in errors["arms.1.optimizer"]
    spec = StudySpec.from_stored(stored)
    assert spec.sampler.name == "cmaes" and spec.labels == ["sgd", "adam"]


def test_a_stored_spec_still_has_its_types_checked_and_its_version_known() -> None:
    stored = StudySpec.model_validate(_spec()).model_dump(mode="json")
    with pytest.raises(ValidationError):
        StudySpec.from_stored({**stored, "budget": {**stored["budget"], "epochs": "3"}})
    with pytest.raises(ValueError, match="version: unknown spec version 2"):
        StudySpec.from_stored({**stored, "version": 2})


def test_reading_a_stored_spec_imports_neither_optuna_nor_torch() -> None:
    """The API, the CLI and the plots read stored specs all the time (`from_stored`); only the
    checks of a new spec build models. A fresh interpreter shows what reading one imports."""
    import json
    import subprocess
    import sys

    stored = StudySpec.model_validate(
        {"name": "x", "task": "digits-mlp", "arms": [{"optimizer": "sgd"}, {"optimizer": "bmp"}]}
    ).model_dump(mode="json")
    code = (
        "import json, sys\n"
        "from worker.spec import StudySpec\n"
        "spec = StudySpec.from_stored(json.loads(sys.argv[1]))\n"
        "heavy = ('torch', 'optuna', 'optim', 'ray', 'sqlalchemy')\n"
        "print(json.dumps([spec.labels, sorted(m for m in heavy if m in sys.modules)]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(stored)], capture_output=True, text=True,
        check=True, timeout=120,
    )  # fmt: skip
    labels, imported = json.loads(out.stdout)
    assert labels == ["sgd", "bmp-local-mean-positions"]  # bmp's defaults, pinned at submit
    assert imported == []
