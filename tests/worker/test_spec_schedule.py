"""An arm's learning-rate schedule in the spec (`worker.spec_schedule`): what it accepts, each
mistake at its field path, swept schedule fields, labels, and the dump (and so the CLI study
key) of a spec without schedules, which must stay what it was."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.cli._run import default_study_key
from worker.arms.optuna.arm import OptunaArmRun
from worker.spec import ScheduleSpec, StudySpec
from worker.spec_schedule import label_part, setting_fields, split_params

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _spec(*arms: dict[str, Any], **changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "t",
        "task": "mnist1d-mlp",
        "arms": list(arms) or [{"optimizer": "sgd"}],
        "budget": {"epochs": 4},
    }
    return {**base, **changes}


def _errors(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(ValidationError) as info:
        StudySpec.model_validate(data)
    return {".".join(map(str, e["loc"])): e["msg"] for e in info.value.errors()}


def test_a_schedule_is_a_name_or_an_object_and_labels_the_arm() -> None:
    spec = StudySpec.model_validate(
        _spec(
            {"optimizer": "sgd"},
            {"optimizer": "sgd", "schedule": "cosine"},
            {"optimizer": "sgd", "schedule": {"name": "cosine", "warmup": 0.05}},
            {"optimizer": "lars", "schedule": {"name": "step", "milestones": [0.5, 0.75]}},
            {"optimizer": "adam", "schedule": {"name": "constant", "warmup_epochs": 1}},
            {"optimizer": "bmp", "fixed": {"propagate": False}, "schedule": "linear"},
        )
    )
    assert spec.labels == [
        "sgd", "sgd+cosine", "sgd+warmup-cosine", "lars+step", "adam+warmup",
        "bmp-local-mean-positions+linear",
    ]  # fmt: skip
    assert spec.arm_schedule(spec.arms[0]) == ScheduleSpec()
    assert spec.arm_schedule(spec.arms[2]).warmup == 0.05


@pytest.mark.parametrize(
    ("schedule", "path", "words"),
    [
        ({"name": "cosine", "warmup": 1.5}, "warmup", "give warmup_epochs for epochs"),
        ({"name": "cosine", "warmup": -0.1}, "warmup", "greater than or equal to 0"),
        ({"name": "step"}, "milestones", "needs milestones"),
        ({"name": "step", "milestones": [0.75, 0.5]}, "milestones", "increase strictly"),
        ({"name": "step", "milestones": [0.5, 1.0]}, "milestones", "within (0, 1)"),
        ({"name": "step", "milestones": [0.5], "floor": 0.1}, "floor", "cosine and linear"),
        ({"name": "cosine", "factor": 0.5}, "factor", "only the step schedule"),
        ({"name": "cosine", "floor": 2}, "floor", "less than or equal to 1"),
        ({"name": "cosine", "warmup": 0.1, "warmup_epochs": 1}, "warmup_epochs", "not both"),
        ({"name": "cosine", "warmup_epochs": 4}, "warmup_epochs", "below budget.epochs (4)"),
        ({"name": "exponential"}, "name", "'constant', 'cosine', 'linear' or 'step'"),
        ({"name": "cosine", "length": 3}, "length", "Extra inputs are not permitted"),
    ],
)
def test_each_mistake_is_named_at_its_field(schedule: Any, path: str, words: str) -> None:
    errors = _errors(_spec({"optimizer": "adam"}, {"optimizer": "sgd", "schedule": schedule}))
    assert words in errors[f"arms.1.schedule.{path}"], errors


def test_the_hypergradient_tuner_refuses_a_schedule() -> None:
    arm = {"optimizer": "sgd", "tuner": "hypergradient", "schedule": "cosine"}
    errors = _errors(_spec(arm, objective={"metric": "val_loss"}))
    assert "learns its own per-step rate schedules" in errors["arms.0.schedule"]
    assert "tuner 'optuna'" in errors["arms.0.schedule"]


def test_schedule_fields_are_swept_like_hyperparameters() -> None:
    arms = [
        {"optimizer": "sgd", "schedule": "cosine"},
        {"optimizer": "adam", "schedule": "cosine",
         "search_space": {"schedule.floor": {"values": [0.0, 0.1]}}},
    ]  # fmt: skip
    space = {
        "lr": {"low": 1e-3, "high": 1.0, "log": True},
        "schedule.warmup": {"low": 0, "high": 0.2},
    }
    spec = StudySpec.model_validate(_spec(*arms, search_space=space))
    assert spec.labels == ["sgd+warmup-cosine", "adam+warmup-cosine"]
    assert set(spec.arm_search_space(spec.arms[1])) == {"lr", "schedule.warmup", "schedule.floor"}
    hyperparameters, schedule = split_params(
        {"lr": 0.1, "momentum": 0.9, "schedule.warmup": 0.15, "schedule.floor": 0.1},
        spec.arm_schedule(spec.arms[1]),
    )
    assert hyperparameters == {"lr": 0.1, "momentum": 0.9}
    assert (schedule.name, schedule.warmup, schedule.floor) == ("cosine", 0.15, 0.1)


WARM = {"low": 0, "high": 0.2}


@pytest.mark.parametrize(
    ("schedule", "field", "dim", "words"),
    [
        ("cosine", "length", WARM, "searchable: schedule.warmup"),
        ("cosine", "factor", {"low": 0.1, "high": 0.5}, "only the step schedule"),
        ({"name": "cosine", "warmup": 0.1}, "warmup", WARM, "both fixed"),
        ({"name": "cosine", "warmup_epochs": 1}, "warmup", WARM, "not both"),
        ("cosine", "warmup", {"low": 0, "high": 1}, "[0, 1)"),
        ("cosine", "warmup_epochs", {"values": [1, 4]}, "[0, 4) (below budget.epochs)"),
        ("linear", "floor", "auto", "no registered range"),
        ("linear", "floor", {"values": [True]}, "a number"),
    ],
)
def test_a_swept_schedule_field_is_checked_against_the_schedule(
    schedule: Any, field: str, dim: Any, words: str
) -> None:
    arm, path = {"optimizer": "sgd", "schedule": schedule}, f"search_space.schedule.{field}"
    space = {f"schedule.{field}": dim}
    errors = _errors(_spec(arm, search_space={"lr": "auto", **space}))
    assert words in errors[path], errors
    own = _errors(_spec({**arm, "search_space": space}))
    assert words in own[f"arms.0.{path}"], own  # an arm's own entry: at the arm's path


def test_a_schedule_field_is_not_fixed_among_the_hyperparameters() -> None:
    errors = _errors(_spec({"optimizer": "sgd", "fixed": {"schedule.warmup": 0.1}}))
    assert "in the arm's schedule" in errors["arms.0.fixed.schedule.warmup"]


def test_warmup_in_epochs_or_as_a_fraction_becomes_optimizer_steps() -> None:
    epochs = ScheduleSpec.model_validate({"name": "cosine", "warmup_epochs": 1.5}).resolve(40, 10)
    assert (epochs.total_steps, epochs.warmup_steps) == (400, 60)
    fraction = ScheduleSpec.model_validate({"name": "cosine", "warmup": 0.05}).resolve(40, 10)
    assert fraction.warmup_steps == 20 and fraction.floor == 0.0
    step = ScheduleSpec.model_validate({"name": "step", "milestones": [0.5]}).resolve(40, 10)
    assert step.factor == 0.1 and step.milestones == (0.5,)


def test_leaderboards_name_every_field_the_schedule_uses() -> None:
    cosine = ScheduleSpec.model_validate("cosine")
    assert setting_fields(cosine, []) == {"name": "cosine", "floor": 0.0}
    assert setting_fields(ScheduleSpec(), []) is None
    assert setting_fields(ScheduleSpec.model_validate({"warmup": 0.0}), []) is None
    assert setting_fields(cosine, ["warmup", "floor"]) == {
        "name": "cosine", "warmup": "searched", "floor": "searched",
    }  # fmt: skip
    assert label_part(ScheduleSpec(), ["warmup"]) == "warmup"


def test_a_spec_without_schedules_dumps_and_hashes_as_before() -> None:
    """No `schedule` key in a dump without schedules: stored specs of this version read back
    unchanged, and `ratebench run` finds the study it ran before by the same key (the keys and
    setting ids below were computed before schedules existed; quick.json's changed once since,
    when bmp's variant options came to be pinned in the arms that leave them out)."""
    for name, key in [
        ("quick.json", "quick-mnist1d-mlp-899101d7b9"),
        ("mnist1d-hypergradient.json", "mnist1d-hypergradient-f30337cd5e"),
    ]:
        spec = StudySpec.model_validate(json.loads((EXAMPLES / name).read_text()))
        stored = spec.model_dump(mode="json")
        assert all("schedule" not in arm for arm in stored["arms"])
        assert default_study_key(spec) == key
        assert StudySpec.from_stored(stored).model_dump(mode="json") == stored
    with_schedule = StudySpec.model_validate(_spec({"optimizer": "sgd", "schedule": "cosine"}))
    stored = with_schedule.model_dump(mode="json")
    assert stored["arms"][0]["schedule"]["name"] == "cosine"
    assert StudySpec.from_stored(stored).model_dump(mode="json") == stored


def test_each_trial_of_a_swept_schedule_gets_its_values(tmp_path: Path) -> None:
    """The Optuna arm splits a trial's values into hyperparameters and its schedule."""
    from worker.storage import open_storage

    space = {"lr": {"values": [0.1]}, "schedule.warmup": {"values": [0.0, 0.25]}}
    spec = StudySpec.model_validate(
        _spec({"optimizer": "sgd", "schedule": "linear"}, search_space=space, sampler="grid")
    )
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    try:
        run = OptunaArmRun.open(spec, 0, storage, "k")
        jobs = [run._ask("sweep", run.sweep) for _ in range(2)]
    finally:
        storage.engine.dispose()
    configs = [job.config for job in jobs]
    assert sorted(c.schedule.warmup for c in configs) == [0.0, 0.25]  # type: ignore[attr-defined]
    assert all(c.hyperparameters == {"lr": 0.1} for c in configs)  # type: ignore[attr-defined]
    assert all(c.schedule.name == "linear" for c in configs)  # type: ignore[attr-defined]
