"""What `POST /api/v1/studies` refuses before it stores anything, on real databases: a step that
needs more memory or FLOPs than a node may give (422 naming the fields), nothing costly before
the key is checked (401 first), validation that runs out of its time, and answers that name no
server path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.cli import main
from service.config import Settings
from tests.service.test_security import SPEC, Api, make_api

EXAMPLES = Path(__file__).parents[2] / "examples"

# The attack of the review: global pooling keeps the parameters of a VGG at 9.4 M whatever the
# image, and 11 images of 4096×4096 are under the synthetic data limit; one step of a batch of 8
# needs 381 GiB of activations.
HUGE_IMAGES: dict[str, Any] = {
    **SPEC,
    "task": "synthetic-vgg",
    "data": {"input_shape": [1, 4096, 4096], "n_examples": 11, "batch_size": 8},
}


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(database_url, tmp_path)


def _locs(response: Any) -> list[list[Any]]:
    assert response.status_code == 422, response.text
    return [item["loc"] for item in response.json()["detail"]]


def test_a_step_over_the_memory_limit_is_422_naming_the_fields(api: Api) -> None:
    response = api.submit("alice", HUGE_IMAGES)
    assert _locs(response) == [
        ["body", "data", "batch_size"],
        ["body", "data", "input_shape"],
        ["body", "model", "width"],
    ]
    message = response.json()["detail"][0]["msg"]
    assert "one training step of the vgg on inputs [1, 4096, 4096] in batches of 8" in message
    assert "382 GiB" in message and "16 GiB per trial (RATEBENCH_MAX_STEP_MEMORY_GB)" in message
    assert "lower data.batch_size, data.input_shape, model.width" in message
    assert {item["type"] for item in response.json()["detail"]} == {"step_cost"}
    # an arm that overrides the width is named at its own field
    arms = [{"optimizer": "sgd"}, {"optimizer": "adam", "model": {"width": 64}}]
    smaller = {**HUGE_IMAGES, "data": {**HUGE_IMAGES["data"], "input_shape": [1, 1024, 1024]}}
    wide = api.submit("alice", {**smaller, "arms": arms, "model": {"width": 2}})  # 0.8, 24 GiB
    assert ["body", "arms", 1, "model", "width"] in _locs(wide), wide.text
    assert ["body", "model", "width"] not in _locs(wide)
    assert api.count() == 0


def test_a_step_over_the_flops_limit_is_refused(sqlite_url: str, tmp_path: Path) -> None:
    for api in make_api(sqlite_url, tmp_path, max_step_gflop=1.0):
        data = {"input_shape": [3, 128, 128], "n_examples": 64, "batch_size": 64}
        cnn = {**SPEC, "task": "synthetic-cnn", "data": data}
        response = api.submit("alice", cnn)
        assert _locs(response) == [
            ["body", "data", "batch_size"],
            ["body", "data", "input_shape"],
            ["body", "model", "width"],
        ]
        assert "floating-point operations; this service allows 1e+09" in response.text
        assert api.count() == 0


def test_a_cohort_over_the_memory_limit_is_refused_at_its_size(
    sqlite_url: str, tmp_path: Path
) -> None:
    for api in make_api(sqlite_url, tmp_path, max_step_memory_gb=1.0):
        # 0.25 GiB a step is fine alone, but 16 trials trained as one cohort are not
        mlp = {**SPEC, "task": "synthetic-mlp",
               "data": {"input_shape": [4096], "n_examples": 1024, "batch_size": 64},
               "model": {"width": 4096, "depth": 1},
               "resources": {"cohort_size": 16}}  # fmt: skip
        response = api.submit("alice", mlp)
        assert _locs(response) == [["body", "resources", "cohort_size"]]
        assert "a cohort of 16 trials trained together" in response.text
        assert "set resources.cohort_size to at most 3" in response.text
        mlp["resources"] = {"cohort_size": 3}
        assert api.submit("alice", mlp).status_code == 202
        assert api.count() == 1


def test_every_example_spec_fits_the_default_limits(
    sqlite_url: str, tmp_path: Path, examples_ready: Path
) -> None:
    """Every example, with what it needs besides ratebench (the example plugin, the arrays
    of breast-cancer.json); CIFAR's files are not made here."""
    for api in make_api(sqlite_url, tmp_path, max_queued_per_key=100):
        for example in sorted(EXAMPLES.glob("*.json")):
            spec = json.loads(example.read_text())
            response = api.submit("alice", spec)
            if response.status_code == 422:  # only the CIFAR files this machine does not have
                assert _locs(response) == [["body", "data", "data_dir"]], (example, response.text)
            else:
                assert response.status_code == 202, (example.name, response.text)


def test_nothing_is_validated_or_checked_before_the_key(api: Api, tmp_path: Path) -> None:
    """Without a valid key every submit is 401, whatever its body: no spec validation (model
    builds), no data-root check that would name the roots, no step estimate."""
    bodies = [
        HUGE_IMAGES,
        {**SPEC, "arms": [{"optimizer": "no-such-scheme"}]},
        {**SPEC, "task": "cifar10-cnn", "data": {"data_dir": str(tmp_path)}},
    ]
    for body in bodies:
        for headers in ({}, {"Authorization": "Bearer rb_not-a-key"}):
            response = api.client.post("/api/v1/studies", json=body, headers=headers)
            assert response.status_code == 401, response.text
            assert str(tmp_path) not in response.text
    assert api.count() == 0


def test_validation_has_a_time_limit(sqlite_url: str, tmp_path: Path) -> None:
    for api in make_api(sqlite_url, tmp_path, max_validation_s=1e-6):
        arms = [
            {"optimizer": "sgd", "label": f"a{i}", "model": {"width": 8 + i}} for i in range(16)
        ]
        response = api.submit("alice", {**SPEC, "arms": arms})
        assert _locs(response) == [["body"]]
        assert "took longer than this service allows" in response.json()["detail"][0]["msg"]
        assert api.count() == 0


def test_ratebench_validate_says_what_the_service_would_refuse(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(HUGE_IMAGES))
    monkeypatch.setenv("RATEBENCH_DATA_DIR", str(tmp_path))
    assert main(["validate", str(spec)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        "data.batch_size", "data.input_shape", "model.width",
    ]  # fmt: skip
    assert Settings().max_step_memory_gb == 16.0
