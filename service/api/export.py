"""`GET /studies/{id}/export`: a whole study as one JSON bundle (`service.export`) that
`ratebench import` loads into another database. Built once per state of the study and view,
then served from `service.response_cache`; a reader who does not own the study gets it without
the hosts it ran on and its data folder (`service.privacy`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response

from service import response_cache
from service.api.deps import ReadDb, Tx, in_thread
from service.api.reads import StudyView, study_view
from service.export import optuna_studies, public_bundle, study_part

router = APIRouter(prefix="/studies", tags=["studies"])


@router.get("/{study_id}/export", response_model=dict[str, Any], responses={404: {}})
async def export_study(study_id: str, db: ReadDb, request: Request) -> Response:
    """`{format: "ratebench-export", version: 1, study, arm_results, trials}`: the study row
    (spec, status, times, error, progress, environment when recorded), its leaderboard rows,
    and per Optuna study of its arms the name, directions, attributes and every trial with
    its parameters and distributions, values, state, intermediate values, attributes and
    times (timezone-aware, UTC). `ratebench import FILE` writes it into another database."""
    view, part = await db.run(_study_part, study_id)
    url = db.settings.resolved_database_url()

    def build() -> bytes:
        # Optuna's storage is opened apart from the request's session, in a few threads.
        bundle = {**part, "trials": optuna_studies(url, study_id, view.spec)}
        if not view.owner:
            bundle = public_bundle(bundle)
        return json.dumps(bundle, allow_nan=False, separators=(",", ":")).encode()

    key = ("export", url, view.version, view.owner)
    content, made = await in_thread(request, "heavy", response_cache.cache.get_or_make, key, build)
    return Response(
        content, media_type="application/json", headers={"X-Cache": "miss" if made else "hit"}
    )


def _study_part(tx: Tx, study_id: str) -> tuple[StudyView, dict[str, Any]]:
    view = study_view(tx, study_id)  # 404 for a study the reader may not read
    part = study_part(tx.session, study_id)
    assert part is not None, "study_view found it"
    return view, part
