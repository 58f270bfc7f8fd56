"""`GET /studies/{id}/plots/{kind}.{fmt}`: sensitivity, learning curves, per-layer factors."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response, status

from service.api.deps import ReadDb, Tx, in_thread
from service.api.reads import readable_study
from service.plots import FORMATS, PlotSource, plot_source, study_plot

router = APIRouter(prefix="/studies", tags=["plots"])

PlotKind = Literal["sensitivity", "curves", "factors"]
PlotFormat = Literal["png", "svg"]


@router.get(
    "/{study_id}/plots/{kind}.{fmt}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}, "image/svg+xml": {}}}, 404: {}},
)
async def get_plot(
    study_id: str, kind: PlotKind, fmt: PlotFormat, db: ReadDb, request: Request
) -> Response:
    """`sensitivity`: objective vs rate per arm (diverged ×, pruned ○, final seeds ◆);
    `curves`: learning curves of the final seeds; `factors`: per-layer factors over training."""
    source = await db.run(_source, study_id)
    # Rendering reads Optuna's storage apart from the request's session, in few threads.
    settings = db.settings
    plot = await in_thread(request, "heavy", study_plot, source, kind, fmt,
                           settings.resolved_database_url(), settings.data_dir)  # fmt: skip
    # X-Cache: "miss" when this request drew the plot, "hit" when it came from a cache.
    headers = {"Cache-Control": "max-age=5", "X-Cache": "miss" if plot.rendered else "hit"}
    return Response(plot.content, media_type=FORMATS[fmt], headers=headers)


def _source(tx: Tx, study_id: str) -> PlotSource:
    readable_study(tx, study_id)  # 404 for a study this reader may not read
    source = plot_source(tx.session, study_id)
    if source is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    return source
