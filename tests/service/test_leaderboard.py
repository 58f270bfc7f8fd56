"""Leaderboards that say what their statistics can tell, on real databases (SQLite file and
PostgreSQL): the performance profile with zero, failed and missing scores, a study's intervals
and tie flags in JSON, task boards grouped by setting with pooled seeds and filters, the home
page's "not run", warnings for too few seeds, and the CLI's table against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient
from scipy.stats import t as scipy_t

from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import session_scope
from service.models import ArmResult, StudyRecord
from tests.service.helpers import ServiceProcess, cli_env, embedded_service, ratebench
from worker.spec import StudySpec

SPEC: dict[str, Any] = {
    "name": "leaderboard-test",
    "task": "mnist1d-mlp",
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
    "search_space": {"lr": {"low": 1e-4, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 4, "epochs": 2, "final_seeds": 2},
}
# quick.json's final seeds: sgd 0.615 ± 0.012 and bmp 0.533 ± 0.001 over two seeds
QUICK = {"sgd": [0.60625, 0.62375], "bmp": [0.53246, 0.53374]}


def store_study(
    engine: sa.Engine,
    study_id: str,
    task: str,
    seeds: Mapping[str, list[float] | None],
    spec: dict[str, Any] = SPEC,
    summaries: Mapping[str, dict[str, Any]] | None = None,
) -> None:
    """A completed study with one stored arm row per arm ({arm: final seed values}; None: the
    arm ran and no seed finished), and `summaries[arm]` added to an arm's stored summary."""
    with session_scope(engine) as session:
        session.add(
            StudyRecord(id=study_id, name=study_id, task=task, spec=spec, status="completed")
        )
        session.flush()
        for rank, (arm, values) in enumerate(seeds.items(), start=1):
            mean = sum(values) / len(values) if values else None
            session.add(
                ArmResult(
                    study_id=study_id, task=task, arm=arm, scheme=arm, metric="val_accuracy",
                    direction="maximize", rank=rank, best_lr=0.01, objective_mean=mean,
                    n_trials=4, n_diverged=0,
                    summary={"final_values": values or [], **(summaries or {}).get(arm, {})},
                )
            )  # fmt: skip


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(database_url=database_url, data_dir=tmp_path, anonymous_reads=True)
    with TestClient(create_app(settings, start_ray=False)) as client:
        yield client


def engine_of(client: TestClient) -> sa.Engine:
    engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
    return engine


def test_profile_takes_zero_and_failed_scores_and_leaves_out_what_was_not_run(
    client: TestClient,
) -> None:
    engine = engine_of(client)
    # every final seed of bmp diverged (accuracy 0); lars failed; lars was not run on digits
    store_study(engine, "a", "mnist1d-mlp", {"sgd": [0.6, 0.6], "bmp": [0.0, 0.0], "lars": None})
    store_study(engine, "b", "digits-mlp", {"sgd": [0.9, 0.9], "bmp": [0.95, 0.95]})
    response = client.get("/api/v1/leaderboard/profile")
    assert response.status_code == 200, response.text
    profile = response.json()
    assert profile["taus"][0] == 1.0
    assert profile["schemes"]["sgd"][0] == 0.5  # wins mnist1d, 5% behind on digits
    assert profile["schemes"]["bmp"][0] == 0.5  # wins digits; gap 1 on mnist1d
    assert profile["schemes"]["bmp"][-1] == 0.5  # τ = 1.5 does not reach a gap of 1
    assert profile["schemes"]["sgd"][-1] == 1.0
    assert profile["schemes"]["lars"] == [0.0] * len(profile["taus"])  # its only task: failed
    assert profile["not_run"] == {"bmp": [], "lars": ["digits-mlp"], "sgd": []}
    assert profile["ran"]["lars"] == ["mnist1d-mlp"]
    for fmt in ("svg", "png"):
        plot = client.get(f"/api/v1/leaderboard/profile.{fmt}")
        assert plot.status_code == 200, plot.text
    page = client.get("/").text
    assert "not run" in page  # lars on digits-mlp: a cell that says so, not a 0
    assert "no score" in page  # lars on mnist1d-mlp ran and has nothing


def test_study_leaderboard_json_clips_intervals_and_says_when_seeds_are_too_few(
    client: TestClient,
) -> None:
    store_study(engine_of(client), "q", "mnist1d-mlp", {**QUICK, "adam": [0.83, 0.882]})
    board = client.get("/api/v1/studies/q/leaderboard").json()
    rows = {row["arm"]: row for row in board["arms"]}
    assert [row["arm"] for row in board["arms"]] == ["adam", "sgd", "bmp"]
    assert rows["adam"]["interval_high"] == 1.0  # t_{0.975,1} = 12.7 would reach 1.187
    assert 0.0 <= rows["adam"]["interval_low"] < 0.856
    assert rows["adam"]["n_seeds"] == 2
    assert rows["sgd"]["ties"] == []  # 2 seeds per arm: no evidence of a tie ...
    assert "bmp" in rows["sgd"]["too_few_seeds_to_tell"]  # ... nor of a difference
    assert rows["sgd"]["confidence"] == 0.95
    assert "summary" not in rows["sgd"]  # the row's fields are not repeated ...
    assert rows["sgd"]["details"]["final_values"] == QUICK["sgd"]  # ... only the others kept
    assert not set(rows["sgd"]["details"]) & set(rows["sgd"]) - {"details"}
    page = client.get("/studies/q").text  # the web page shows the same rows
    assert "too few seeds to tell" in page
    assert ", 1]" in page  # adam's interval, clipped at an accuracy of 1


def test_submit_warns_when_a_spec_asks_for_too_few_seeds(client: TestClient) -> None:
    with session_scope(engine_of(client)) as session:
        key = create_key(session, "tests").key
    headers = {"Authorization": f"Bearer {key}"}
    few = client.post("/api/v1/studies", json=SPEC, headers=headers).json()
    assert len(few["warnings"]) == 1
    assert "final_seeds" in few["warnings"][0]
    default = {**SPEC, "name": "default-seeds", "budget": {"trials_per_arm": 4, "epochs": 2}}
    answer = client.post("/api/v1/studies", json=default, headers=headers).json()
    assert answer["warnings"] == []
    study = client.get(f"/api/v1/studies/{answer['id']}").json()
    assert study["spec"]["budget"]["final_seeds"] == 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    """A real service (no scheduler, no Ray) on a fresh SQLite file."""
    for service in embedded_service(tmp_path_factory.mktemp("board") / "data"):
        service.env["RATEBENCH_RUN_SCHEDULER"] = "false"
        service.start()
        yield service


@pytest.mark.slow
def test_cli_leaderboard_shows_intervals_and_what_the_seeds_cannot_tell(
    server: ServiceProcess,
) -> None:
    engine = sa.create_engine(f"sqlite:///{server.data_dir / 'ratebench.db'}")
    try:
        store_study(engine, "cli", "mnist1d-mlp", QUICK)
    finally:
        engine.dispose()
    env = cli_env(server)
    table = ratebench("leaderboard", "--study", "cli", env=env)
    assert "too few seeds to tell" in table
    sgd = next(line for line in table.splitlines() if " sgd " in line)
    assert "[0.5" in sgd and "bmp" in sgd  # its interval, and bmp under "too few seeds"
    rows = json.loads(ratebench("leaderboard", "--study", "cli", "--json", env=env))["arms"]
    assert rows[0]["too_few_seeds_to_tell"] == ["bmp"]
    assert rows[0]["interval_low"] is not None


@pytest.mark.slow
def test_cli_submit_warns_on_stderr_when_seeds_are_too_few(
    server: ServiceProcess, tmp_path: Path
) -> None:
    key = ratebench("keys", "create", "--name", "warn", env=server.env).strip()
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "name": "few-seeds"}))
    result = subprocess.run(
        [sys.executable, "-m", "service.cli", "submit", str(spec)],
        capture_output=True, text=True, env=cli_env(server, key), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 1  # stdout stays the study id alone, for scripts
    assert "warning: budget.final_seeds: 2 seeds" in result.stderr


def _spec(epochs: int, momentum: float = 0.9, width: int | None = None) -> dict[str, Any]:
    arms = [{"optimizer": "sgd", "fixed": {"momentum": momentum}}, {"optimizer": "adam"}]
    model = {} if width is None else {"model": {"width": width}}
    return {**SPEC, **model, "arms": arms, "budget": {**SPEC["budget"], "epochs": epochs}}


@pytest.fixture
def settings_board(client: TestClient) -> TestClient:
    """Four studies on one task: two of the same setting (on other seeds: independent
    evidence), one without momentum (same group, another arm setting for sgd), one of 15 epochs
    on a wider model (another group)."""
    engine = engine_of(client)
    store_study(engine, "two-a", "mnist1d-mlp", {"sgd": [0.60, 0.62], "adam": [0.80, 0.82]},
                _spec(2))  # fmt: skip
    store_study(engine, "two-b", "mnist1d-mlp", {"sgd": [0.64, 0.66], "adam": [0.84]},
                {**_spec(2), "seed": 10})  # fmt: skip
    store_study(engine, "nomom", "mnist1d-mlp", {"sgd": [0.50, 0.52]}, _spec(2, momentum=0.0))
    store_study(engine, "long", "mnist1d-mlp", {"sgd": [0.90, 0.91], "adam": [0.88, 0.90]},
                _spec(15, width=64))  # fmt: skip
    return client


def _board(client: TestClient, query: str = "") -> dict[str, Any]:
    response = client.get(f"/api/v1/leaderboard?task=mnist1d-mlp{query}")
    assert response.status_code == 200, response.text
    board: dict[str, Any] = response.json()
    return board


def test_task_board_pools_seeds_within_a_setting_and_never_across(
    settings_board: TestClient,
) -> None:
    board = _board(settings_board)
    assert [g["studies"] for g in board["groups"]] == [["nomom", "two-a", "two-b"], ["long"]]
    short, long = board["groups"]
    assert "2 epochs" in short["description"] and "15 epochs" in long["description"]
    assert "width 64" in long["description"]
    assert short["setting"]["budget"] == {"epochs": 2, "steps_per_epoch": None}
    rows = {(r["arm"], r["setting_description"]): r for r in short["arms"]}
    assert set(rows) == {("adam", "scheme defaults"), ("sgd", "fixed: momentum 0.9"),
                         ("sgd", "fixed: momentum 0")}  # fmt: skip
    adam, sgd = rows["adam", "scheme defaults"], rows["sgd", "fixed: momentum 0.9"]
    assert [r["arm"] for r in short["arms"]] == ["adam", "sgd", "sgd"]  # best first
    assert rows["sgd", "fixed: momentum 0"]["studies"] == ["nomom"]  # not pooled with 0.9
    # the 2-epoch studies' seeds pooled, with a Student-t interval over all of them
    for row, seeds in ((sgd, [0.60, 0.62, 0.64, 0.66]), (adam, [0.80, 0.82, 0.84])):
        n, mean = len(seeds), sum(seeds) / len(seeds)
        std = (sum((v - mean) ** 2 for v in seeds) / (n - 1)) ** 0.5
        half = float(scipy_t.ppf(0.975, n - 1)) * std / n**0.5
        assert row["n_seeds"] == n
        assert row["objective_mean"] == pytest.approx(mean)
        assert row["interval_low"] == pytest.approx(mean - half)
        assert row["interval_high"] == pytest.approx(mean + half)
        assert row["studies"] == ["two-a", "two-b"]
    assert sgd["interval_low"] == pytest.approx(0.588915, abs=1e-6)  # 0.63 ∓ 3.1824 · 0.0129
    assert sgd["best_study"] == "two-b" and sgd["objective_best"] == pytest.approx(0.65)
    assert long["arms"][0]["objective_mean"] == pytest.approx(0.905)  # 15 epochs: apart
    assert long["arms"][0]["model"]["width"] == 64
    assert board["filter_values"]["epochs"] == [2, 15]
    assert board["filter_values"]["fixed.momentum"] == [0.9, 0.0]


def test_task_board_filters_on_setting_fields(settings_board: TestClient) -> None:
    def studies(query: str) -> list[list[str]]:
        return [g["studies"] for g in _board(settings_board, query)["groups"]]

    assert studies("&epochs=15") == [["long"]]
    assert studies("&model.width=64") == [["long"]]
    assert studies("&model.width=null") == [["nomom", "two-a", "two-b"]]
    board = _board(settings_board, "&epochs=2&fixed.momentum=0.9")
    assert board["filters"] == {"epochs": 2, "fixed.momentum": 0.9}
    assert [(r["arm"], r["studies"]) for r in board["groups"][0]["arms"]] == [
        ("sgd", ["two-a", "two-b"])
    ]
    unfixed = _board(settings_board, "&fixed.momentum=null")["groups"]
    assert {r["arm"] for g in unfixed for r in g["arms"]} == {"adam"}
    long_id = _board(settings_board)["groups"][1]["id"]
    assert studies(f"&setting={long_id}") == [["long"]]
    assert studies("&metric=val_accuracy&data.batch_size=128") == [
        ["nomom", "two-a", "two-b"], ["long"]
    ]  # fmt: skip
    assert studies("&epochs=3") == []  # a filter that matches nothing: an empty board
    for query, name in (("&colour=red", "colour"), ("&model.colour=red", "model.colour"),
                        ("&epochs=2&epochs=15", "epochs"), ("&epochs=two", "epochs")):  # fmt: skip
        response = settings_board.get(f"/api/v1/leaderboard?task=mnist1d-mlp{query}")
        assert response.status_code == 422, (query, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", name]
    docs = settings_board.get("/openapi.json").json()
    description = docs["paths"]["/api/v1/leaderboard"]["get"]["description"]
    assert "fixed.momentum=0.9" in description and "model.width=64" in description


def test_task_page_shows_one_table_per_setting_with_its_filters(
    settings_board: TestClient,
) -> None:
    page = settings_board.get("/tasks/mnist1d-mlp").text
    assert page.count('<section class="group"') == 2
    assert "2 epochs × one pass" in page and "15 epochs × one pass" in page
    assert '/studies/two-a">two-a</a>' in page and '/studies/long">long</a>' in page
    assert '<select name="fixed.momentum">' in page and '<select name="epochs">' in page
    assert 'href="/docs"' in page and "optuna-dashboard &lt;database URL&gt;" in page
    filtered = settings_board.get("/tasks/mnist1d-mlp?epochs=15&model.width=").text
    assert filtered.count('<section class="group"') == 1  # the form's blank fields: ignored
    assert '<option value="15" selected>' in filtered
    assert settings_board.get("/tasks/mnist1d-mlp?colour=red").status_code == 422


def _times(seconds: float | None, steps: float | None = None) -> dict[str, Any]:
    return {"time_to_target_s": seconds, "steps_to_target": steps}


def test_profile_on_time_to_target_ranks_by_the_ratio_to_the_fastest_arm(
    client: TestClient,
) -> None:
    """AlgoPerf's measure: τ = an arm's time to its study's target over the task's fastest
    arm's. On mnist1d-mlp adam is fastest and sgd takes 2×; bmp reached the target in one of
    its two studies only, so its median is "never": it ran and is within no τ. On digits sgd
    is fastest and adam takes 3×; bmp was not run there. By steps, sgd wins both."""
    engine = engine_of(client)
    seeds = {"sgd": [0.6, 0.6], "adam": [0.7, 0.7], "bmp": [0.5, 0.5]}
    store_study(engine, "t1", "mnist1d-mlp", seeds,
                summaries={"sgd": _times(2.0, 100), "adam": _times(1.0, 200),
                           "bmp": _times(1.5, 300)})  # fmt: skip
    store_study(engine, "t2", "mnist1d-mlp", seeds, {**SPEC, "seed": 10},
                summaries={"sgd": _times(2.0, 100), "adam": _times(1.0, 200),
                           "bmp": _times(None)})  # fmt: skip
    store_study(engine, "t3", "digits-mlp", {"sgd": [0.9, 0.9], "adam": [0.8, 0.8]},
                summaries={"sgd": _times(1.0, 50), "adam": _times(3.0, 400)})  # fmt: skip
    response = client.get("/api/v1/leaderboard/profile", params={"measure": "time"})
    assert response.status_code == 200, response.text
    profile = response.json()
    assert profile["measure"] == "time"
    taus = profile["taus"]
    assert (taus[0], taus[-1]) == (1.0, 4.0)

    def rho(arm: str, tau: float) -> float:
        return float(profile["schemes"][arm][taus.index(pytest.approx(tau))])

    assert (rho("adam", 1.0), rho("sgd", 1.0)) == (0.5, 0.5)  # each fastest on one task
    assert (rho("sgd", 1.95), rho("sgd", 2.0)) == (0.5, 1.0)  # 2× adam on mnist1d
    assert (rho("adam", 2.95), rho("adam", 3.0)) == (0.5, 1.0)  # 3× sgd on digits
    assert profile["schemes"]["bmp"] == [0.0] * len(taus)  # never reached in half its studies
    assert profile["not_run"]["bmp"] == ["digits-mlp"]
    steps = client.get("/api/v1/leaderboard/profile?measure=steps").json()
    assert steps["measure"] == "steps" and steps["schemes"]["sgd"][0] == 1.0
    assert client.get("/api/v1/leaderboard/profile").json()["measure"] == "score"
    plot = client.get("/api/v1/leaderboard/profile.svg?measure=time")
    assert plot.status_code == 200 and b"time to target" in plot.content
    wrong = client.get("/api/v1/leaderboard/profile?measure=speed")
    assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["query", "measure"]


def test_study_leaderboard_and_page_show_times_training_time_and_schedule(
    client: TestClient,
) -> None:
    spec = {**SPEC, "arms": [{"optimizer": "sgd", "schedule": {"name": "cosine", "warmup": 0.05}},
                             {"optimizer": "adam"}]}  # fmt: skip
    schedule = {"name": "cosine", "warmup": 0.05, "floor": 0.0}
    summaries = {
        "sgd+warmup-cosine": {"target": 0.57, "steps_to_target": 120.0, "time_to_target_s": 1.5,
                              "train_time_s": 64.25, "ms_per_step": 2.5, "schedule": schedule,
                              "cohort_sizes": [1, 4]},
        "adam": {"target": 0.57, "steps_to_target": None, "time_to_target_s": None,
                 "train_time_s": 80.0, "ms_per_step": 3.125, "schedule": None},
    }  # fmt: skip
    seeds = {"sgd+warmup-cosine": [0.6, 0.62], "adam": [0.55, 0.56]}
    store_study(engine_of(client), "timed", "mnist1d-mlp", seeds, spec, summaries)
    board = client.get("/api/v1/studies/timed/leaderboard").json()
    rows = {row["arm"]: row for row in board["arms"]}
    sgd, adam = rows["sgd+warmup-cosine"], rows["adam"]
    assert (sgd["steps_to_target"], sgd["time_to_target_s"], sgd["target"]) == (120.0, 1.5, 0.57)
    assert (sgd["train_time_s"], sgd["ms_per_step"]) == (64.25, 2.5)
    assert sgd["schedule"] == schedule and adam["schedule"] is None
    assert adam["time_to_target_s"] is None and adam["train_time_s"] == 80.0
    assert "time_to_target_s" not in sgd["details"] and sgd["details"]["cohort_sizes"] == [1, 4]
    page = client.get("/studies/timed").text
    assert "time→<wbr>target" in page and "train time" in page
    assert "cosine, warmup 0.05, floor 0" in page  # the schedule, in words
    assert 'time-to-target">1.5 s<' in page and 'steps-to-target">120<' in page
    assert 'train-time">1 min 4 s<' in page and 'train-time">1 min 20 s<' in page
    old = {"sgd": [0.6, 0.61], "adam": [0.5, 0.52]}
    store_study(engine_of(client), "old", "mnist1d-mlp", old)  # stored before times were
    for row in client.get("/api/v1/studies/old/leaderboard").json()["arms"]:
        assert row["train_time_s"] is None and row["schedule"] is None


def test_arms_with_different_schedules_never_pool_and_filter_by_schedule(
    client: TestClient,
) -> None:
    """Two studies whose sgd arm has the same label but not the same schedule: two rows in one
    table, each with its own schedule; the schedule is a filter like any setting field."""
    cosine = {"name": "cosine", "warmup": 0.05}
    arms = [{"optimizer": "sgd", "label": "sgd"}, {"optimizer": "adam"}]
    scheduled = {**SPEC, "arms": [{**arms[0], "schedule": cosine}, arms[1]]}
    engine = engine_of(client)
    store_study(engine, "plain", "mnist1d-mlp", {"sgd": [0.6, 0.62], "adam": [0.7]},
                {**SPEC, "arms": arms})  # fmt: skip
    store_study(engine, "cosine", "mnist1d-mlp", {"sgd": [0.8, 0.82], "adam": [0.71]}, scheduled)
    (group,) = _board(client)["groups"]
    sgd = sorted((r for r in group["arms"] if r["arm"] == "sgd"), key=lambda r: r["studies"])
    assert [r["studies"] for r in sgd] == [["cosine"], ["plain"]]  # not pooled
    assert sgd[0]["schedule"] == {"name": "cosine", "warmup": 0.05, "floor": 0.0}
    assert sgd[1]["schedule"] is None
    assert "schedule: cosine, warmup 0.05, floor 0" in sgd[0]["setting_description"]
    adam = [r for r in group["arms"] if r["arm"] == "adam"]
    assert [sorted(r["studies"]) for r in adam] == [["cosine", "plain"]]  # the same setting
    board = _board(client)
    assert board["filter_values"]["schedule.name"] == ["constant", "cosine"]
    only = _board(client, "&schedule.name=cosine")["groups"][0]["arms"]
    assert [(r["arm"], r["studies"]) for r in only] == [("sgd", ["cosine"])]
    assert [r["studies"] for r in _board(client, "&schedule.warmup=0.05")["groups"][0]["arms"]] == [
        ["cosine"]
    ]
    page = client.get("/tasks/mnist1d-mlp").text
    assert '<select name="schedule.name">' in page and "warmup 0.05" in page


def test_bmp_position_modes_never_pool_on_a_task_board(client: TestClient) -> None:
    """bmp in sum mode, with `mean_over_positions` fixed true and with it searched: three rows
    of one table, each with its own study, and a filter on the option."""
    engine = engine_of(client)
    for study, arm in (
        ("sum", {"optimizer": "bmp", "fixed": {"propagate": True, "mean_over_positions": False}}),
        ("mean", {"optimizer": "bmp", "fixed": {"propagate": True, "mean_over_positions": True}}),
        ("both", {"optimizer": "bmp", "fixed": {"propagate": True},
                  "search_space": {"mean_over_positions": "auto"}}),
    ):  # fmt: skip
        spec = {**SPEC, "name": study, "arms": [arm]}
        label = StudySpec.model_validate(spec).labels[0]
        store_study(engine, study, "mnist1d-mlp", {label: [0.5, 0.52]}, spec)
    (group,) = _board(client)["groups"]
    rows = {r["arm"]: r["studies"] for r in group["arms"]}
    assert rows == {"bmp": ["sum"], "bmp-mean-positions": ["mean"],
                    "bmp-positions-searched": ["both"]}  # fmt: skip
    board = _board(client, "&fixed.mean_over_positions=true")
    assert [r["arm"] for g in board["groups"] for r in g["arms"]] == ["bmp-mean-positions"]
