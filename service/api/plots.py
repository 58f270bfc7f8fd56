"""`GET /studies/{id}/plots/{kind}.{fmt}`: sensitivity, learning curves, per-layer factors."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Response, status

from service.api.auth import ReadAccess
from service.api.deps import SessionDep, SettingsDep
from service.models import StudyRecord
from service.plots import FORMATS, study_plot

router = APIRouter(prefix="/studies", tags=["plots"])

PlotKind = Literal["sensitivity", "curves", "factors"]
PlotFormat = Literal["png", "svg"]


@router.get(
    "/{study_id}/plots/{kind}.{fmt}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}, 404: {}},
)
def get_plot(
    study_id: str,
    kind: PlotKind,
    fmt: PlotFormat,
    session: SessionDep,
    settings: SettingsDep,
    _: ReadAccess,
) -> Response:
    """`sensitivity`: objective vs rate per arm (diverged ×, pruned ○, final seeds ◆);
    `curves`: learning curves of the final seeds; `factors`: per-layer factors over training."""
    study = session.get(StudyRecord, study_id)
    if study is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    content = study_plot(study, kind, fmt, settings.resolved_database_url(), settings.data_dir)
    return Response(content, media_type=FORMATS[fmt], headers={"Cache-Control": "max-age=5"})
