"""`GET /metrics`: Prometheus metrics (`service.metrics`), for the scraper; open to all.

It needs no API key, like /health: it tells counts, never a study's content. It is left out of
the OpenAPI document (it is not part of the REST API) and of its own request metrics. The
scrape reads the database, in a /health thread, so it answers even while the API is busy.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from service.api.deps import in_thread
from service.metrics import METRICS_PATH, AppMetrics

router = APIRouter(include_in_schema=False)


@router.get(METRICS_PATH)
async def metrics(request: Request) -> Response:
    app_metrics: AppMetrics = request.app.state.metrics
    accept = request.headers.get("accept", "")
    body, content_type = await in_thread(request, "health", app_metrics.render, accept)
    return Response(body, headers={"Content-Type": content_type})
