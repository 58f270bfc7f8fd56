"""`GET /tasks` and `GET /schemes`: what a client may put in a spec, from the registries."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

import optim
from service.api.deps import ReadDb
from worker.tasks import describe_tasks

router = APIRouter(tags=["catalog"])


@router.get("/schemes")
async def list_schemes(db: ReadDb) -> list[dict[str, Any]]:
    """Every scheme with its hyperparameters: type, default, valid range, usual sweep scale."""
    await db.authorize()
    return [
        {
            "name": s.name,
            "summary": s.summary,
            "reference": s.reference,
            "layerwise": s.layerwise,
            "hyperparameters": [asdict(h) for h in s.hyperparameters],
        }
        for s in optim.SCHEMES.values()
    ]


@router.get("/tasks")
async def list_tasks(db: ReadDb) -> list[dict[str, Any]]:
    """Every installed task, ratebench's own and the plugins' (dataset × model): its package and
    version, kind, loss and metrics, default input shape and outputs (null where the data
    options or files decide them), the data options it takes, and its model's options (type,
    default, bounds or choices) that a spec's `model` object may set."""
    await db.authorize()
    return describe_tasks()
