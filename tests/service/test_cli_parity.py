"""The CLI reaches what the API and web pages show: studies, tasks, schemes, trials (table and
CSV), plots and bundles from a service over real HTTP (uvicorn in this process, no Ray), the
study leaderboard with the columns `ratebench run` prints, `validate` refusing what `submit`
would refuse with the same field paths, and help text on every command and argument."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.auth import create_key
from service.cli import _parser, main
from service.config import Settings, get_settings
from service.db import get_engine, session_scope
from tests.service.seeded import SPEC, http_server, seed_finished_study

STUDY = "parity"
EXAMPLES = Path(__file__).parents[2] / "examples"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URL, API key) of a real service holding one finished, seeded study."""
    tmp = tmp_path_factory.mktemp("parity")
    url = f"sqlite:///{tmp / 'ratebench.db'}"
    seed_finished_study(url, STUDY)
    with session_scope(get_engine(url)) as session:
        key = create_key(session, "parity").key
    settings = Settings(database_url=url, data_dir=tmp, anonymous_reads=True, run_scheduler=False)
    with http_server(create_app(settings, start_ray=False)) as base:
        yield base, key


def api(server: tuple[str, str], path: str, **params: Any) -> httpx.Response:
    response = httpx.get(f"{server[0]}/api/v1{path}", params=params, timeout=60)
    assert response.status_code == 200, response.text
    return response


def cli(capsys: pytest.CaptureFixture[str], *args: str, code: int = 0) -> str:
    assert main(list(args)) == code, capsys.readouterr().err
    return capsys.readouterr().out


def test_every_command_and_argument_has_help() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {choice.dest: choice.help for choice in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(_parser(), "ratebench")
    assert missing == []


def test_list_filters_and_prints_the_apis_page(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server[0]
    page = json.loads(cli(capsys, "list", "--json", "--url", url))
    assert page == api(server, "/studies", limit=50, offset=0).json()
    assert [s["id"] for s in page["items"]] == [STUDY]
    table = cli(capsys, "list", "--status", "completed", "--task", "mnist1d-mlp", "--url", url)
    assert STUDY in table and "16/16" in table and "1 of 1 studies" in table
    assert "0 of 0 studies" in cli(capsys, "list", "--status", "queued", "--url", url)


def test_tasks_and_schemes_come_from_the_api(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server[0]
    for what, name in (("tasks", "mnist1d-mlp"), ("schemes", "sgd")):
        assert (
            json.loads(cli(capsys, what, "--json", "--url", url)) == api(server, f"/{what}").json()
        )
        assert name in cli(capsys, what, "--url", url)


def test_trials_as_a_table_and_as_the_apis_csv(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server[0]
    for form in ("wide", "long"):
        out = cli(capsys, "trials", STUDY, "--csv", "--form", form, "--url", url)
        assert out == api(server, f"/studies/{STUDY}/trials.csv", form=form).text
    table = cli(capsys, "trials", STUDY, "--url", url)
    for outcome in ("complete", "pruned", "diverged", "failed"):
        assert outcome in table
    assert "16 trials" in table
    assert "HTTP 404" in _error(capsys, "trials", "nope", "--url", url)


def _error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    assert main(list(args)) == 2
    return capsys.readouterr().err


def test_study_leaderboard_shows_the_columns_ratebench_run_prints(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server[0]
    rows = json.loads(cli(capsys, "leaderboard", "--study", STUDY, "--json", "--url", url))["arms"]
    table = cli(capsys, "leaderboard", "--study", STUDY, "--url", url)
    for column in ("best lr", "95% interval", "test", "steps→target", "time→target", "band"):
        assert column in table
    for row in rows:
        s = {**(row.get("details") or row.get("summary") or {}), **row}
        line = next(line for line in table.splitlines() if f" {row['arm']} " in line)
        assert f"{s['n_complete']}/{s['n_pruned']}/{s['n_diverged']}/{s['n_failed']}" in line
        assert f"{row['objective_mean']:.4f}" in line
        assert f"{s['test_mean']:.4f}" in line


def test_plot_with_url_fetches_the_apis_plots(
    server: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = cli(capsys, "plot", STUDY, "--url", server[0], "--kind", "sensitivity",
              "--format", "svg", "--out", str(tmp_path))  # fmt: skip
    path = tmp_path / f"{STUDY}-sensitivity.svg"
    assert out.strip() == str(path)
    assert path.read_bytes() == api(server, f"/studies/{STUDY}/plots/sensitivity.svg").content
    # `--url` alone: the configured RATEBENCH_URL, and no database is opened
    monkeypatch.setenv("RATEBENCH_URL", server[0])
    monkeypatch.setenv("RATEBENCH_DATABASE_URL", f"sqlite:///{tmp_path / 'absent' / 'x.db'}")
    get_settings.cache_clear()
    try:
        cli(capsys, "plot", STUDY, "--url", "--kind", "curves", "--out", str(tmp_path))
    finally:
        get_settings.cache_clear()
    assert (tmp_path / f"{STUDY}-curves.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "absent").exists()


def test_export_writes_the_apis_bundle(
    server: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bundle.json"
    cli(capsys, "export", STUDY, "--out", str(path), "--url", server[0])
    assert json.loads(path.read_text()) == api(server, f"/studies/{STUDY}/export").json()


def _spec(tmp_path: Path, data: dict[str, Any]) -> str:
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "changes",
    [
        {"arms": [{"optimizer": "nope"}], "budget": {"epochs": 0}},
        {"budget": {"trials_per_arm": 500, "epochs": 500, "final_seeds": 5}},
        {"task": "cifar10-resnet", "data": {"data_dir": "/etc"}},
    ],
    ids=["fields", "budget", "data-dir"],
)
def test_validate_refuses_what_submit_refuses_with_the_same_field_paths(
    server: tuple[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    changes: dict[str, Any],
) -> None:
    spec = {**SPEC, **changes}
    lines = cli(capsys, "validate", _spec(tmp_path, spec), code=2).splitlines()
    assert lines and all(": " in line for line in lines)
    base, key = server
    answer = httpx.post(f"{base}/api/v1/studies", json=spec, timeout=60,
                        headers={"Authorization": f"Bearer {key}"})  # fmt: skip
    assert answer.status_code == 422, answer.text
    paths = {".".join(str(p) for p in e["loc"] if p != "body") for e in answer.json()["detail"]}
    assert {line.split(": ", 1)[0] for line in lines} == paths


def test_validate_accepts_the_examples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "validate", str(EXAMPLES / "quick.json")).strip() == "ok"
    assert "cannot read" in _error(capsys, "validate", str(tmp_path / "missing.json"))


def test_the_client_follows_the_port_the_service_was_moved_to(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RATEBENCH_PORT=9000 ratebench serve` moves the service; the same variable, without
    RATEBENCH_URL, moves the client (it used to keep asking port 8000)."""
    port = httpx.URL(server[0]).port
    monkeypatch.delenv("RATEBENCH_URL", raising=False)
    monkeypatch.setenv("RATEBENCH_PORT", str(port))
    get_settings.cache_clear()
    try:
        out = cli(capsys, "list")
    finally:
        get_settings.cache_clear()
    assert STUDY in out
    assert Settings(port=9000, host="0.0.0.0").client_url() == "http://127.0.0.1:9000"
    assert Settings(port=9000, url="http://api:1").client_url() == "http://api:1"


def test_tables_keep_every_column_when_piped_and_follow_columns(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Piped without COLUMNS, the study table comes out whole (its last column and the end of
    its caption were cut at 160 columns); with COLUMNS, no line is wider than it says."""
    url = server[0]
    monkeypatch.delenv("COLUMNS", raising=False)
    table = cli(capsys, "leaderboard", "--study", STUDY, "--url", url)
    assert "too few seeds to tell ┃" in table
    assert "no evidence either way" in " ".join(table.split())
    assert max(len(line) for line in table.splitlines()) > 160
    monkeypatch.setenv("COLUMNS", "200")
    table = cli(capsys, "leaderboard", "--study", STUDY, "--url", url)
    assert max(len(line) for line in table.splitlines()) <= 200
    assert "no evidence either way" in " ".join(table.split())


def test_submit_wait_prints_each_warning_once_on_its_own_line(
    server: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The seed warning of `submit` once, at the start of a line; nothing repeats it after
    the study's status table. The study is cancelled while queued so that the wait ends."""
    import threading
    import time

    base, key = server
    auth = {"Authorization": f"Bearer {key}"}
    submitted = threading.Event()

    def cancel_when_queued() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            page = httpx.get(f"{base}/api/v1/studies", params={"status": "queued"}, timeout=30)
            for study in page.json()["items"]:
                if study["name"] == "waited":
                    httpx.post(f"{base}/api/v1/studies/{study['id']}/cancel", headers=auth,
                               timeout=30)  # fmt: skip
                    submitted.set()
                    return
            time.sleep(0.2)

    canceller = threading.Thread(target=cancel_when_queued, daemon=True)
    canceller.start()
    spec = _spec(tmp_path, {**SPEC, "name": "waited"})
    code = main(["submit", spec, "--wait", "--url", base, "--key", key])
    canceller.join(timeout=60)
    assert submitted.is_set() and code == 1  # cancelled
    out, err = capsys.readouterr()
    lines = (out + err).splitlines()
    warned = [line for line in lines if "too few for Welch's test" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: budget.final_seeds: 3 seeds")
    assert "status=cancelled" in out


def test_status_labels_the_best_sweep_trial_apart_from_the_final_seeds(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.cli._client import _print_status

    monkeypatch.delenv("COLUMNS", raising=False)
    arm = {"status": "sweep", "complete": 3, "pruned": 0, "diverged": 1, "failed": 0,
           "running": 1, "budget": 8, "best_value": 0.8125}  # fmt: skip
    _print_status({"name": "s", "id": "s", "task": "mnist1d-mlp", "status": "running",
                   "spec": {"objective": {"metric": "val_accuracy"}},
                   "progress": {"arms": {"sgd": arm}}, "warnings": []})  # fmt: skip
    out = capsys.readouterr().out
    assert "best sweep val_accuracy" in out and "0.8125" in out
    assert "the ranking uses the final seeds' mean" in " ".join(out.split())


def test_task_leaderboard_takes_the_apis_setting_filters(
    server: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    url = server[0]
    task = "mnist1d-mlp"
    board = json.loads(cli(capsys, "leaderboard", "--task", task, "--epochs", "3", "--json",
                           "--url", url))  # fmt: skip
    assert board == api(server, "/leaderboard", task=task, epochs=3).json()
    assert board["filters"] == {"epochs": 3} and board["groups"]
    narrowed = json.loads(cli(capsys, "leaderboard", "--task", task, "--filter",
                              "fixed.momentum=0.9", "--steps-per-epoch", "1000", "--json",
                              "--url", url))  # fmt: skip
    expected = api(server, "/leaderboard", **{"task": task, "fixed.momentum": "0.9",
                                              "steps_per_epoch": 1000})  # fmt: skip
    assert narrowed == expected.json()
    table = cli(capsys, "leaderboard", "--task", task, "--filter", "fixed.momentum=0.9",
                "--url", url)  # fmt: skip
    assert "final-seed mean" in table and "95% interval" in table and "sgd" in table
    assert "fixed.momentum=0.9" in " ".join(table.split())
    for args, message in (
        (("--filter", "model.nope=1"), "unknown filter 'model.nope'"),
        (("--filter", "epochs=3", "--epochs", "3"), "filter 'epochs' given twice"),
        (("--filter", "width"), "write NAME=VALUE"),
    ):
        assert message in _error(capsys, "leaderboard", "--task", task, *args, "--url", url)
    assert "--epochs" in _error(capsys, "leaderboard", "--study", STUDY, "--epochs", "3",
                                "--url", url)  # fmt: skip
    with pytest.raises(SystemExit):
        main(["leaderboard", "--task", task, "--epochs", "0", "--url", url])
    assert "must be at least 1" in capsys.readouterr().err


def test_a_submit_to_an_api_not_listening_says_it_waits_then_fails_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The README starts the service and submits at once: `submit` keeps trying while nothing
    listens, says so on its first refusal, and ends with one line, not a traceback."""
    from tests.service.helpers import free_port

    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    url = f"http://127.0.0.1:{free_port()}"
    code = main(["submit", str(spec_file), "--url", url, "--wait-for-api", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"waiting for the API at {url} to listen (up to 1 s;" in err
    assert err.count("waiting for the API") == 1
    assert (
        err.rstrip()
        .splitlines()[-1]
        .startswith(f"ratebench submit: error: cannot reach the API at {url}")
    )
    assert "Traceback" not in err
