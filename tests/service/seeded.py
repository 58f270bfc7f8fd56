"""A finished study written straight into a database, as a scheduler would leave it, without
training: the study row, Optuna trials of every outcome with per-epoch history, and the
leaderboard rows `worker.summary` computes from them. Plus a real HTTP server in this process
(uvicorn in a thread, no Ray) for the CLI to talk to."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import optuna
import uvicorn
from fastapi import FastAPI
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from service.db import get_engine, migrate, session_scope
from service.models import ArmResult, StudyRecord, utcnow
from tests.service.helpers import free_port
from worker.arms.base import final_study_name, sweep_study_name
from worker.spec import StudySpec
from worker.storage import open_storage
from worker.summary import summarize_study

SPEC: dict[str, Any] = {
    "name": "seeded",
    "task": "mnist1d-mlp",
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}, {"optimizer": "adam"}],
    "search_space": {"lr": {"low": 1e-3, "high": 1.0, "log": True}},
    "budget": {"trials_per_arm": 4, "epochs": 3, "final_seeds": 3},
}
# sweep: (lr, outcome); the failed trial's error looks like a spreadsheet formula
SWEEP = [
    (1e-3, "complete"),
    (1e-2, "pruned"),
    (1e-1, "complete"),
    (1.0, "diverged"),
    (0.5, "failed"),
]
FORMULA_ERROR = '=HYPERLINK("http://x")'


def _history(value: float, epochs: int) -> list[dict[str, Any]]:
    return [
        {"epoch": e, "step": 10 * e, "train_loss": 2.0 / e, "val_loss": 2.0 / e,
         "val_accuracy": round(value * e / epochs, 6), "wall_time": 0.1 * e}
        for e in range(1, epochs + 1)
    ]  # fmt: skip


# Where the seeded trials ran, as `worker.arms.base` records it (`host`, `pid`, `node`)
HOST = {"host": "gpu-node-7.internal", "pid": 4242}
NODE = {"hostname": "gpu-node-7.internal", "ip": "10.1.2.3", "ray_node_id": "ab" * 28,
        "cpu": "Some CPU", "gpus": []}  # fmt: skip


def _trial(
    arm: str, lr: float, outcome: str, value: float, final: int | None = None, node: bool = False,
    scheme: str | None = None, fixed: dict[str, Any] | None = None, epochs: int = 3,
) -> Any:  # fmt: skip
    if fixed is None:
        fixed = {"momentum": 0.9} if arm == "sgd" else {}
    attrs: dict[str, Any] = {"arm": arm, "scheme": scheme or arm, "lr": lr, "outcome": outcome,
                             "fixed": fixed, "attempt": 1, "seed": final or 0, "steps": 30,
                             "role": "sweep" if final is None else "final"}  # fmt: skip
    if node:
        attrs.update(HOST, node=NODE)
    epochs = epochs - 1 if outcome == "pruned" else epochs
    if outcome != "failed":
        attrs["history"] = _history(value, epochs)
    if final is not None:
        attrs.update(test_accuracy=value - 0.01, test_loss=1.0 - value)
    distributions: dict[str, BaseDistribution] = {"lr": FloatDistribution(1e-3, 1.0, log=True)}
    if outcome == "failed":
        attrs["error"] = FORMULA_ERROR
        return create_trial(state=TrialState.FAIL, params={"lr": lr},
                            distributions=distributions, user_attrs=attrs)  # fmt: skip
    state = TrialState.PRUNED if outcome == "pruned" else TrialState.COMPLETE
    return create_trial(
        state=state, value=value, params={"lr": lr}, distributions=distributions,
        user_attrs=attrs, intermediate_values={1: value / 2, 2: value},
    )  # fmt: skip


def seed_finished_study(
    url: str,
    study_id: str,
    *,
    name: str | None = None,
    api_key_id: int | None = None,
    public: bool = False,
    on_node: bool = False,
    fields: dict[str, Any] | None = None,
    seed: int = 0,
    shift: float = 0.0,
) -> StudySpec:
    """Write a completed study `study_id` into the (migrated) database at `url`, named `name`
    (default: its id), submitted by `api_key_id`; `on_node`: with the environment and trial
    attributes of a study that ran on `NODE`. `fields` replace those of `SPEC` (its two arms,
    3 epochs, 3 final seeds): every arm gets `SWEEP` and the final seeds, each arm a little
    behind the one before. Its spec has `seed`, so its final seeds are `seed + 1 …`; a final
    seed's value is a function of the seed, as training's is, plus `shift` (another machine's
    arithmetic)."""
    migrate(url)
    spec = StudySpec.model_validate(
        {**SPEC, **(fields or {}), "name": name or study_id, "seed": seed}
    )
    epochs = spec.budget.epochs
    storage = open_storage(url)
    try:
        for offset, arm in enumerate(spec.arms):
            label, fixed = str(arm.label), dict(getattr(arm, "fixed", None) or {})
            scheme = str(getattr(arm, "optimizer", label))
            sweep = optuna.create_study(storage=storage, direction="maximize",
                                        study_name=sweep_study_name(study_id, label))  # fmt: skip
            for i, (lr, outcome) in enumerate(SWEEP):
                value = 0.0 if outcome == "diverged" else 0.5 + 0.1 * i - 0.05 * offset
                sweep.add_trial(_trial(label, lr, outcome, value, node=on_node, scheme=scheme,
                                       fixed=fixed, epochs=epochs))  # fmt: skip
            final = optuna.create_study(storage=storage, direction="maximize",
                                        study_name=final_study_name(study_id, label))  # fmt: skip
            for i in range(spec.budget.final_seeds):
                final_seed = spec.seed + 1 + i
                value = 0.7 - 0.05 * offset + 0.01 * (final_seed - 1) + shift
                final.add_trial(_trial(label, 0.1, "complete", value, final_seed, on_node,
                                       scheme=scheme, fixed=fixed, epochs=epochs))  # fmt: skip
    finally:
        storage.engine.dispose()
    done = len(spec.arms) * (len(SWEEP) + spec.budget.final_seeds)
    rows = summarize_study(url, study_id, spec)
    with session_scope(get_engine(url)) as session:
        session.add(
            StudyRecord(id=study_id, name=spec.name, task=spec.task, status="completed",
                        spec=spec.model_dump(mode="json"), started_at=utcnow(),
                        finished_at=utcnow(), progress={"trials_done": done, "trials_total": done},
                        api_key_id=api_key_id, public=public,
                        environment={"hostname": NODE["hostname"], "python": "3.11",
                                     "nodes": [NODE]} if on_node else None)
        )  # fmt: skip
        session.flush()
        for rank, row in enumerate(rows, start=1):
            data = row.to_dict()
            session.add(
                ArmResult(
                    study_id=study_id, task=spec.task, arm=row.arm, scheme=row.scheme,
                    metric=spec.objective.metric, direction=str(spec.objective.direction),
                    rank=rank, best_lr=row.best_lr, objective_mean=row.objective_mean,
                    objective_std=row.objective_std, test_mean=row.test_mean,
                    n_trials=row.n_trials, n_diverged=row.n_diverged, summary=data,
                )
            )  # fmt: skip
    return spec


@contextmanager
def http_server(app: FastAPI) -> Iterator[str]:
    """`app` served over real HTTP on 127.0.0.1 from a thread of this process; yields its URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
