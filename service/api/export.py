"""`GET /studies/{id}/export`: a whole study as one JSON bundle (`service.export`) that
`ratebench import` loads into another database. Mounted under `/studies` by
`service.api.studies`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Request, status

from service.api.deps import ReadDb, Tx, in_thread
from service.export import optuna_studies, study_part
from worker.spec import StudySpec

router = APIRouter(tags=["studies"])


@router.get("/{study_id}/export", responses={404: {}})
async def export_study(study_id: str, db: ReadDb, request: Request) -> dict[str, Any]:
    """`{format: "ratebench-export", version: 1, study, arm_results, trials}`: the study row
    (spec, status, times, error, progress, environment when recorded), its leaderboard rows,
    and per Optuna study of its arms the name, directions, attributes and every trial with
    its parameters and distributions, values, state, intermediate values, attributes and
    times. `ratebench import FILE` writes it into another database."""
    bundle = await db.run(_study_part, study_id)
    spec = StudySpec.from_stored(bundle["study"]["spec"])
    # Optuna's storage is opened apart from the request's session, in a few threads of its own.
    url = db.settings.resolved_database_url()
    bundle["trials"] = await in_thread(request, "heavy", optuna_studies, url, study_id, spec)
    return bundle


def _study_part(tx: Tx, study_id: str) -> dict[str, Any]:
    bundle = study_part(tx.session, study_id)
    if bundle is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    return bundle
