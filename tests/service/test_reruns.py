"""A re-run of the same configuration on the same seed is the same evidence (`service.evidence`):
the task board, the performance profile (by score and by time) and the home page's best arm
count it once and say how many values they folded; seeds that differ, or a configuration that
differs, still pool; a re-run that disagrees keeps the first stored value and is counted as
disagreeing. The home page's best arm says when its seeds are too few to tell it apart. One
test submits the same spec twice to a real service that trains it; the others write finished
studies straight into the database (`tests.service.seeded`), as a scheduler leaves them."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.config import Settings
from tests.service.helpers import (
    ServiceProcess,
    cli_env,
    get,
    ratebench,
    tiny_spec,
    wait_until_finished,
)
from tests.service.seeded import seed_finished_study
from tests.service.test_leaderboard import SPEC, engine_of, store_study

TASK = "mnist1d-mlp"


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, data_dir=tmp_path, anonymous_reads=True)
    with TestClient(create_app(settings, start_ray=False)) as client:
        yield client


def _json(client: TestClient, path: str) -> Any:
    response = client.get(f"/api/v1{path}")
    assert response.status_code == 200, response.text
    return response.json()


def _rows(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The board's one group's rows by arm."""
    (group,) = board["groups"]
    return {row["arm"]: row for row in group["arms"]}


def _pooled(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a board row says of its seeds' evidence."""
    return row["n_seeds"], row["objective_mean"], row["interval_low"], row["interval_high"]


def _text(html: str) -> str:
    """A page's text, tags and runs of white space collapsed."""
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def _best_arm_cell(client: TestClient) -> str:
    page = client.get("/").text
    found = re.search(r'<td class="best-arm">(.*?)</td>', page, re.S)
    assert found is not None, page
    return _text(found.group(1)).strip()


def test_a_study_run_three_times_counts_once_on_the_board_profile_and_home_page(
    client: TestClient, database_url: str
) -> None:
    seed_finished_study(database_url, "first")
    single = _rows(_json(client, f"/leaderboard?task={TASK}"))
    study = {row["arm"]: row for row in _json(client, "/studies/first/leaderboard")["arms"]}
    assert study["sgd"]["details"]["final_seeds"] == [1, 2, 3]  # each value's seed, stored
    profiles = {m: _json(client, f"/leaderboard/profile?measure={m}") for m in ("score", "time")}
    best = _best_arm_cell(client)
    for again in ("again", "third"):
        seed_finished_study(database_url, again)
    rows = _rows(_json(client, f"/leaderboard?task={TASK}"))
    for arm in ("sgd", "adam"):
        assert _pooled(rows[arm]) == _pooled(single[arm]), arm
        assert rows[arm]["n_seeds"] == 3 and rows[arm]["n_reruns"] == 6, rows[arm]
        assert rows[arm]["n_disagreeing"] == 0
        assert rows[arm]["studies"] == ["first", "again", "third"]
        # a single run's interval is its study's own
        assert rows[arm]["interval_low"] == pytest.approx(study[arm]["interval_low"])
        assert rows[arm]["interval_high"] == pytest.approx(study[arm]["interval_high"])
    for measure, before in profiles.items():
        after = _json(client, f"/leaderboard/profile?measure={measure}")
        assert after["schemes"] == before["schemes"], measure
        assert after["seeds"] == before["seeds"] == {TASK: {"adam": 3, "sgd": 3}}
        assert before["reruns"] == {TASK: {"adam": 0, "sgd": 0}}
        assert after["reruns"] == {TASK: {"adam": 6, "sgd": 6}}
    assert _best_arm_cell(client) == best == "sgd"  # Welch's test tells 3 seeds apart
    page = _text(client.get("/").text)
    assert "6 (+12 re-runs counted once)" in page  # the task's distinct seeds and re-runs
    task_page = _text(client.get(f"/tasks/{TASK}").text)
    assert "3 (+6 re-runs counted once)" in task_page


def test_other_seeds_pool_and_shared_seeds_count_once(
    client: TestClient, database_url: str
) -> None:
    """Seeds 1-3 and 2-4 (specs with seed 0 and 1) share two seeds: four distinct seeds, two
    re-runs. A study whose seeds are all new adds all of them."""
    seed_finished_study(database_url, "zero")
    seed_finished_study(database_url, "one", seed=1)
    seed_finished_study(database_url, "ten", seed=10)
    rows = _rows(_json(client, f"/leaderboard?task={TASK}"))
    expected = [0.7 + 0.01 * (s - 1) for s in (1, 2, 3, 4, 11, 12, 13)]
    sgd = rows["sgd"]
    assert (sgd["n_seeds"], sgd["n_reruns"], sgd["n_disagreeing"]) == (7, 2, 0)
    assert sgd["objective_mean"] == pytest.approx(sum(expected) / len(expected))
    profile = _json(client, "/leaderboard/profile")
    assert profile["seeds"] == {TASK: {"adam": 7, "sgd": 7}}
    assert profile["reruns"] == {TASK: {"adam": 2, "sgd": 2}}


def test_a_rerun_that_disagrees_keeps_the_first_value_and_says_so(
    client: TestClient, database_url: str
) -> None:
    seed_finished_study(database_url, "here")
    single = _rows(_json(client, f"/leaderboard?task={TASK}"))
    seed_finished_study(database_url, "elsewhere", shift=0.002)  # another machine's values
    rows = _rows(_json(client, f"/leaderboard?task={TASK}"))
    for arm in ("sgd", "adam"):
        assert _pooled(rows[arm]) == _pooled(single[arm])
        assert (rows[arm]["n_reruns"], rows[arm]["n_disagreeing"]) == (3, 3)
    page = _text(client.get(f"/tasks/{TASK}").text)
    assert "3 (+3 re-runs counted once, 3 disagreeing)" in page


def test_another_configuration_on_the_same_seeds_is_other_evidence(client: TestClient) -> None:
    """The same seeds at another chosen rate, or under another divergence bound, are another
    configuration: they pool. Rows stored before seeds were recorded have them inferred when
    they hold every final seed of their study; a row missing one never folds."""
    engine = engine_of(client)
    seeds = {"sgd": [0.6, 0.62], "adam": [0.7, 0.72]}
    at = {arm: {"best_params": {"lr": 0.01}, "final_seeds": [1, 2]} for arm in seeds}
    other_rate = {arm: {"best_params": {"lr": 0.02}, "final_seeds": [1, 2]} for arm in seeds}
    bound = {**SPEC, "objective": {"metric": "val_accuracy", "divergence_factor": 5.0}}
    store_study(engine, "a", TASK, seeds, summaries=at)
    store_study(engine, "rate", TASK, seeds, summaries=other_rate)
    store_study(engine, "bound", TASK, seeds, bound, summaries=at)
    store_study(engine, "old", TASK, {"sgd": seeds["sgd"]},
                summaries={"sgd": {"best_params": {"lr": 0.01}}})  # fmt: skip
    one_seed = {"best_params": {"lr": 0.01}, "final_seeds": [1]}  # its seed 2 failed
    store_study(engine, "partial", TASK, {"adam": [0.7]}, summaries={"adam": one_seed})
    store_study(engine, "old-partial", TASK, {"sgd": [0.6]})
    rows = _rows(_json(client, f"/leaderboard?task={TASK}"))
    # sgd: a, rate, bound are 6 seeds; old's inferred seeds 1, 2 repeat a's; old-partial's one
    # value is no seed it can name
    assert (rows["sgd"]["n_seeds"], rows["sgd"]["n_reruns"]) == (7, 2)
    # adam: partial's seed 1 repeats a's (its seeds are stored)
    assert (rows["adam"]["n_seeds"], rows["adam"]["n_reruns"]) == (6, 1)


def test_time_profile_leaves_out_a_study_that_only_reran_seeds_already_timed(
    client: TestClient,
) -> None:
    """adam takes 1 s to its target in study a and 3 s in study b (other seeds); a's re-run
    times 1 s again. Counted as a third study the median would be 1 s, tied with sgd; it is
    2 s, twice sgd's."""
    engine = engine_of(client)
    seeds = {"sgd": [0.6, 0.62], "adam": [0.7, 0.72]}

    def timed(adam: float, first: int) -> dict[str, dict[str, Any]]:
        return {"sgd": {"time_to_target_s": 1.0, "final_seeds": [first, first + 1]},
                "adam": {"time_to_target_s": adam, "final_seeds": [first, first + 1]}}  # fmt: skip

    store_study(engine, "a", TASK, seeds, summaries=timed(1.0, 1))
    store_study(engine, "b", TASK, seeds, {**SPEC, "seed": 10}, summaries=timed(3.0, 11))
    store_study(engine, "a-again", TASK, seeds, summaries=timed(1.0, 1))
    profile = _json(client, "/leaderboard/profile?measure=time")
    taus = profile["taus"]
    assert profile["schemes"]["sgd"][0] == 1.0
    assert profile["schemes"]["adam"][taus.index(pytest.approx(1.95))] == 0.0
    assert profile["schemes"]["adam"][taus.index(pytest.approx(2.0))] == 1.0
    assert profile["reruns"] == {TASK: {"adam": 2, "sgd": 2}}


def test_home_page_names_the_best_arm_with_what_its_seeds_can_tell(client: TestClient) -> None:
    """Two seeds Welch's test cannot separate: too few to tell, however often the study is
    re-run (counted as six seeds, they would read as a tie). Five clearly apart: the best arm
    alone. Five that the test cannot separate: a tie, named."""
    engine = engine_of(client)
    five = {**SPEC, "budget": {**SPEC["budget"], "final_seeds": 5}}
    for study in ("few", "few-again", "few-third"):
        store_study(engine, study, TASK, {"sgd": [0.60, 0.66], "adam": [0.62, 0.70]})
    store_study(
        engine,
        "apart",
        "digits-mlp",
        {"sgd": [0.50, 0.51, 0.52, 0.50, 0.51], "adam": [0.90, 0.91, 0.92, 0.90, 0.91]},
        five,
    )
    store_study(
        engine,
        "close",
        "mnist1d-cnn",
        {"sgd": [0.80, 0.84, 0.78, 0.83, 0.80], "adam": [0.81, 0.79, 0.84, 0.80, 0.82]},
        five,
    )
    page = client.get("/").text
    cells = [_text(c).strip() for c in re.findall(r'<td class="best-arm">(.*?)</td>', page, re.S)]
    # tasks in name order: digits-mlp, mnist1d-cnn, mnist1d-mlp
    assert cells == ["adam", "adam (ties: sgd)", "adam (too few seeds to tell)"]
    assert 'class="few">(too few seeds to tell)' in page


@pytest.mark.slow
@pytest.mark.ray
def test_the_same_spec_submitted_twice_to_a_service_counts_once(
    service: ServiceProcess, tmp_path: Path
) -> None:
    """Trained for real: the second run reproduces the first's final values, and the board,
    the profile, the home page and the CLI count them once."""
    service.start()
    key = ratebench("keys", "create", "--name", "reruns", env=service.env).strip()
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(tiny_spec("twice", trials=2)))
    env = cli_env(service, key)
    first = ratebench("submit", str(spec_file), env=env).strip()
    second = ratebench("submit", str(spec_file), env=env).strip()
    assert first != second
    for study_id in (first, second):
        study = wait_until_finished(service, study_id)
        assert study["status"] == "completed", study["error"] or service.log()
    runs = [
        {row["arm"]: row for row in get(service, f"/studies/{study_id}/leaderboard")["arms"]}
        for study_id in (first, second)
    ]
    board = get(service, f"/leaderboard?task={TASK}")
    rows = _rows(board)
    for arm, row in rows.items():
        one = runs[0][arm]
        assert one["details"]["final_values"] == runs[1][arm]["details"]["final_values"], arm
        assert (row["n_seeds"], row["n_reruns"], row["n_disagreeing"]) == (2, 2, 0), row
        assert row["objective_mean"] == pytest.approx(one["objective_mean"])
        assert row["interval_low"] == pytest.approx(one["interval_low"])
        assert row["interval_high"] == pytest.approx(one["interval_high"])
    profile = get(service, "/leaderboard/profile")
    assert profile["seeds"] == {TASK: {"adam": 2, "sgd": 2}}
    assert profile["reruns"] == {TASK: {"adam": 2, "sgd": 2}}
    page = httpx_text(f"{service.url}/")
    assert "(too few seeds to tell)" in page  # two seeds per arm
    table = ratebench("leaderboard", "--task", TASK, env=env)
    assert "2 (+2 re-runs)" in table


def httpx_text(url: str) -> str:
    import httpx

    response = httpx.get(url, timeout=30)
    response.raise_for_status()
    return response.text
