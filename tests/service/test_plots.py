"""Study plots under concurrency, against a real server: a study page asks for its plots at
once, and matplotlib is not thread-safe (log-axis tick labels went through its mathtext parser
from several threads and failed with 500). Every plot is drawn once per state of the study's
trials: concurrent first requests share one render, later ones are cache hits (`X-Cache`), and
a new trial result draws again."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import optuna
import pytest
import sqlalchemy as sa
from optuna.distributions import FloatDistribution
from optuna.trial import create_trial

from service.db import session_scope
from service.models import StudyRecord
from tests.service.helpers import ServiceProcess, embedded_service
from worker.arms.base import final_study_name, sweep_study_name
from worker.storage import open_storage

SPEC: dict[str, Any] = {
    "name": "plots-test",
    "task": "mnist1d-mlp",
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "bmp"}],
    "search_space": {"lr": {"low": 1e-3, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 4, "epochs": 3, "final_seeds": 2},
}
PLOTS = [f"{kind}.{fmt}" for kind in ("sensitivity", "curves", "factors") for fmt in ("png", "svg")]
RATES = [1e-3, 1e-2, 1e-1, 1.0]


def _trial(arm: str, lr: float, value: float, outcome: str = "complete") -> Any:
    history = [
        {"epoch": e, "step": 10 * e, "val_accuracy": value * e / 3, "val_loss": 2.0 / e,
         "train_loss": 2.0 / e, "wall_time": 0.1 * e}
        for e in (1, 2, 3)
    ]  # fmt: skip
    attrs: dict[str, Any] = {"arm": arm, "scheme": arm, "lr": lr, "outcome": outcome}
    attrs["history"] = history
    if arm == "bmp":  # per-layer factors: a log-scale plot
        attrs["layer_factors"] = {"names": ["0.weight", "1.weight"],
                                  "values": [[0.01, 20.0], [0.02, 30.0], [0.03, 40.0]]}  # fmt: skip
    return create_trial(
        params={"lr": lr},
        distributions={"lr": FloatDistribution(1e-3, 1.0, log=True)},
        value=value,
        user_attrs=attrs,
    )


def add_trials(url: str, study_id: str, sweep: list[float], final: int) -> None:
    """Sweep trials at `sweep`'s rates and `final` seeds at 0.1 for every arm (the last rate
    diverged); the study's Optuna studies are created on first use."""
    storage = open_storage(url)
    try:
        for arm in ("sgd", "bmp"):
            for name, rates in ((sweep_study_name, sweep), (final_study_name, [0.1] * final)):
                study = optuna.create_study(
                    storage=storage, study_name=name(study_id, arm), direction="maximize",
                    load_if_exists=True,
                )  # fmt: skip
                for i, lr in enumerate(rates):
                    diverged = name is sweep_study_name and lr == 1.0
                    value = 0.0 if diverged else 0.5 + 0.05 * i
                    outcome = "diverged" if diverged else "complete"
                    study.add_trial(_trial(arm, lr, value, outcome))
    finally:
        storage.engine.dispose()


@pytest.fixture
def server(database_url: str, tmp_path: Path) -> Iterator[ServiceProcess]:
    """A real service (no scheduler, no Ray) on a fresh SQLite file or PostgreSQL database."""
    for service in embedded_service(tmp_path / "data"):
        service.env["RATEBENCH_RUN_SCHEDULER"] = "false"
        service.env["RATEBENCH_DATABASE_URL"] = database_url
        service.start()
        yield service


def fetch_all_at_once(server: ServiceProcess, study_id: str, copies: int) -> list[httpx.Response]:
    """`copies` concurrent requests for every plot, released together from real threads."""
    paths = [f"/api/v1/studies/{study_id}/plots/{plot}" for plot in PLOTS] * copies
    start = threading.Barrier(len(paths))

    def get(path: str) -> httpx.Response:
        start.wait(timeout=60)
        return httpx.get(server.url + path, timeout=120)

    with ThreadPoolExecutor(len(paths)) as pool:
        return list(pool.map(get, paths))


def misses(responses: list[httpx.Response]) -> list[str]:
    return sorted(r.url.path.rsplit("/", 1)[1] for r in responses if r.headers["X-Cache"] == "miss")


@pytest.mark.slow
def test_concurrent_first_fetches_draw_each_plot_once(server: ServiceProcess) -> None:
    url = server.env["RATEBENCH_DATABASE_URL"]
    engine = sa.create_engine(url)
    try:
        with session_scope(engine) as session:
            session.add(StudyRecord(id="running", name="running", task="mnist1d-mlp",
                                    spec=SPEC, status="running"))  # fmt: skip
    finally:
        engine.dispose()
    add_trials(url, "running", RATES, final=2)

    first = fetch_all_at_once(server, "running", copies=10)
    failed = [(r.url.path, r.status_code, r.text[:300]) for r in first if r.status_code != 200]
    assert failed == [], server.log()
    assert {r.headers["content-type"] for r in first} == {"image/png", "image/svg+xml"}
    assert misses(first) == sorted(PLOTS)  # ten requests for each plot, one render each

    again = fetch_all_at_once(server, "running", copies=2)
    assert [r.status_code for r in again] == [200] * len(again)
    assert misses(again) == []  # nothing changed: nothing drawn
    assert {r.content for r in again if r.url.path.endswith("sensitivity.svg")} == {
        r.content for r in first if r.url.path.endswith("sensitivity.svg")
    }

    add_trials(url, "running", [0.3], final=0)  # a new result: every plot may change
    changed = httpx.get(f"{server.url}/api/v1/studies/running/plots/sensitivity.svg", timeout=60)
    assert changed.status_code == 200
    assert changed.headers["X-Cache"] == "miss"
    assert changed.content not in {r.content for r in first}
    cached = httpx.get(f"{server.url}/api/v1/studies/running/plots/sensitivity.svg", timeout=60)
    assert cached.headers["X-Cache"] == "hit"

    engine = sa.create_engine(url)
    try:
        with session_scope(engine) as session:
            session.execute(sa.update(StudyRecord).values(status="completed"))
    finally:
        engine.dispose()
    plot = f"{server.url}/api/v1/studies/running/plots/curves.png"
    finished = [httpx.get(plot, timeout=60).headers["X-Cache"] for _ in range(2)]
    assert finished == ["miss", "hit"]  # a finished study's plots are drawn once, to disk
    assert (server.data_dir / "plots" / "running" / "curves.png").is_file()


def test_factor_plot_names_layers_as_the_model_does() -> None:
    """The names a layer-wise scheme really records (one step of bmp on the arm's model) come
    back in the legend with their module and shape; position-only names are resolved too."""
    import torch
    import torch.nn.functional as F

    import optim
    from worker.report import plots
    from worker.results import TrialRecord
    from worker.spec import StudySpec
    from worker.tasks import build_model

    spec = StudySpec.from_stored({**SPEC, "model": {"width": 32, "depth": 1}})
    model = build_model("mlp", (40,), 10, width=32, depth=1)
    optimizer = optim.build("bmp", model, lr=0.1)
    loss = F.cross_entropy(model(torch.randn(8, 40)), torch.randint(0, 10, (8,)))
    loss.backward()
    optimizer.step()
    names = list(optimizer.layer_factors())  # type: ignore[attr-defined]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    record = {"names": [*names, "0.2"], "values": [[1.0] * 5, [2.0] * 5]}
    trial = TrialRecord("bmp", "final", 0, "COMPLETE", "complete", 0.5, {"lr": 0.1},
                        {"layer_factors": record}, {}, None, None)  # fmt: skip
    svg = plots.factors(spec, [trial], "svg").decode()
    for label in ("0.weight (Linear, 32×40)", "0.bias (Linear, 32)",
                  "2.weight (Linear, 10×32)", "2.bias (Linear, 10)"):  # fmt: skip
        assert f"<!-- {label} -->" in svg, label
    assert svg.count("<!-- 2.weight (Linear, 10×32) -->") == 2  # "0.2": the third tensor
