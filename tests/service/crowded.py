"""A service's worth of long, realistic page content, written straight into a database without
training (`tests.service.seeded`): 32-digit study ids, several studies pooled into each row
of a task board, two settings, long study names (one without a space), long arm settings and
arm labels, a failed arm's long error, and where the trials ran. The page-width test
(`tests/service/test_web.py`) and the README's screenshots
(`scripts/task_leaderboard_screenshot.py`) render the same content."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from service.db import get_engine, session_scope
from service.models import StudyRecord
from tests.service.seeded import seed_finished_study

TASK = "mnist1d-mlp"
ARMS: list[dict[str, Any]] = [
    {"optimizer": "sgd", "fixed": {"momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}},
    {"optimizer": "adam", "fixed": {"weight_decay": 1e-4}},
    {"optimizer": "adam", "model": {"width": 256}},
    {"optimizer": "bmp"},
]
POOLED_NAME = "mnist1d-mlp width 128: sgd+nesterov vs adam vs bmp, 3 epochs, 3 final seeds"
UNSPACED_NAME = "quick-mnist1d-mlp-width256-depth3-nesterov-weightdecay-5e-4-rerun-after-datafix"
ERROR = (
    "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 15.78 GiB total "
    "capacity; 13.12 GiB already allocated; 1.05 GiB free; 13.40 GiB reserved in total by "
    "PyTorch) while training arm adam+width=256, trial 7, seed 3, epoch 2 of 3"
)


@dataclass
class Crowded:
    """The ids of what `seed_crowded` wrote: `pooled`, three studies of one spec (their rows
    pooled on the task board), `other`, a study in a second setting (2 epochs), and `detailed`,
    the study whose page carries the environment, its nodes and a failed arm."""

    pooled: list[str] = field(default_factory=list)
    other: str = ""
    detailed: str = ""


def study_id() -> str:
    return uuid.uuid4().hex  # as `service.queue` makes them


def seed_crowded(url: str) -> Crowded:
    """Seed the database at `url` (migrated here) with `Crowded`'s studies."""
    seeded = Crowded()
    fields: dict[str, Any] = {"arms": ARMS, "model": {"width": 128}}
    for n in range(3):
        seeded.pooled.append(study_id())
        name = POOLED_NAME if n else UNSPACED_NAME
        seed_finished_study(url, seeded.pooled[-1], name=name, fields=fields, on_node=n == 0)
    seeded.other = study_id()
    budget = {"trials_per_arm": 4, "epochs": 2, "final_seeds": 3}
    seed_finished_study(
        url, seeded.other, name="2-epoch rerun", fields={**fields, "budget": budget}
    )
    seeded.detailed = seeded.pooled[0]
    engine = get_engine(url)
    with session_scope(engine) as session:
        study = session.get(StudyRecord, seeded.detailed)
        assert study is not None
        arms = {
            label: {"status": "completed", "complete": 4, "pruned": 1, "diverged": 1,
                    "failed": 1, "running": 0, "budget": 8, "best_value": 0.6512345}
            for label in ("sgd", "adam", "bmp")
        }  # fmt: skip
        arms["adam+width=256"] = {"status": "failed", "error": ERROR, "complete": 2, "failed": 1,
                                  "budget": 8, "best_value": 0.41}  # fmt: skip
        session.execute(
            sa.update(StudyRecord)
            .where(StudyRecord.id == seeded.detailed)
            .values(progress={**(study.progress or {}), "arms": arms})
        )
    return seeded
