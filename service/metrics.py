"""Prometheus metrics of one app, served at `GET /metrics` (`service.api.metrics`).

Each app has its own `CollectorRegistry` (several apps in one process, as in tests, never share
counters). It holds:

- `ratebench_http_requests_total{method,route,status}` and
  `ratebench_http_request_duration_seconds{method,route}`: counted by `RequestMetrics`, labelled
  with the route's template (`/api/v1/studies/{study_id}`), never the raw path, so ids do not
  make a series each; a path that matches no route is `route="unmatched"`, and a method other
  than HTTP's usual ones (`METHODS`) is `method="other"`: the client chooses both, and every
  distinct label value would be a series kept for the life of the process. Scrapes of
  `/metrics` are left out.
- What the database says at scrape time (`StudyCollector`), so that every API process reports
  the same whether or not it runs the scheduler: `ratebench_studies{status}` (the queue's depth
  by status), `ratebench_running_trials` (the trials that running studies reported running, as
  of their scheduler's last lease renewal: at most a third of the lease old) and
  `ratebench_trials_total{outcome}` (complete, pruned, diverged, failed: summed over the stored
  progress of every study, so it reads one small JSON per study). `ratebench_database_up` is 0
  when the database cannot be read; the scrape still answers, without those series.
- `ratebench_scheduler_lease_renewals_total` and `ratebench_scheduler_leases_lost_total`: only
  where the scheduler runs in this process (`LeaseCounters`, counted by `service.scheduler`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import sqlalchemy as sa
from fastapi.routing import iter_route_contexts
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.models import StudyRecord, StudyStatus

__all__ = [
    "METHODS",
    "METRICS_PATH",
    "AppMetrics",
    "LeaseCounters",
    "RequestMetrics",
    "StudyCollector",
]

log = logging.getLogger(__name__)
METRICS_PATH = "/metrics"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OUTCOMES = ("complete", "pruned", "diverged", "failed")


class LeaseCounters:
    """A scheduler's lease renewals and losses, counted from its heartbeat threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.renewals = 0
        self.losses = 0

    def renewed(self) -> None:
        with self._lock:
            self.renewals += 1

    def lost(self) -> None:
        with self._lock:
            self.losses += 1


class StudyCollector(Collector):
    """Reads the queue and the studies' progress at each scrape (two queries)."""

    def __init__(self, engine: sa.Engine, leases: Callable[[], LeaseCounters | None]) -> None:
        self.engine, self.leases = engine, leases

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ratebench_database_up", "1 when the database answered this scrape, else 0"
        )
        try:
            by_status, running_trials, outcomes = self._read()
        except Exception as exc:  # a scrape of a server whose database is down still answers
            log.warning("metrics: database unavailable (%s)", str(exc).splitlines()[0])
            up.add_metric([], 0)
            yield up
        else:
            up.add_metric([], 1)
            yield up
            studies = GaugeMetricFamily(
                "ratebench_studies", "studies in the queue, by status", labels=["status"]
            )
            for status in StudyStatus:
                studies.add_metric([status.value], by_status.get(status.value, 0))
            yield studies
            yield GaugeMetricFamily(
                "ratebench_running_trials",
                "trials running in running studies, as of their last lease renewal",
                value=running_trials,
            )
            trials = CounterMetricFamily(
                "ratebench_trials",
                "trials that ended, by outcome, over every stored study",
                labels=["outcome"],
            )
            for outcome in OUTCOMES:
                trials.add_metric([outcome], outcomes[outcome])
            yield trials
        yield from self._lease_metrics()

    def _read(self) -> tuple[dict[str, int], int, dict[str, int]]:
        with self.engine.connect() as conn:
            counts = conn.execute(
                sa.select(StudyRecord.status, sa.func.count()).group_by(StudyRecord.status)
            ).all()
            progress = conn.execute(
                sa.select(StudyRecord.status, StudyRecord.progress).where(
                    StudyRecord.progress.is_not(None)
                )
            ).all()
        running, outcomes = 0, dict.fromkeys(OUTCOMES, 0)
        for status, study_progress in progress:
            for arm in _arms(study_progress):
                for outcome in OUTCOMES:
                    outcomes[outcome] += _count(arm, outcome)
                if status == StudyStatus.RUNNING.value:
                    running += _count(arm, "running")
        return {status: n for status, n in counts}, running, outcomes

    def _lease_metrics(self) -> Iterator[Metric]:
        leases = self.leases()
        if leases is None:  # no scheduler in this process: nothing to report, not zero
            return
        yield CounterMetricFamily(
            "ratebench_scheduler_lease_renewals",
            "lease renewals by this process's scheduler",
            value=leases.renewals,
        )
        yield CounterMetricFamily(
            "ratebench_scheduler_leases_lost",
            "studies this process's scheduler found claimed by another scheduler",
            value=leases.losses,
        )


def _arms(progress: Any) -> list[dict[str, Any]]:
    arms = progress.get("arms") if isinstance(progress, dict) else None
    return [arm for arm in arms.values() if isinstance(arm, dict)] if isinstance(arms, dict) else []


def _count(arm: dict[str, Any], field: str) -> int:
    value = arm.get(field)
    return value if isinstance(value, int) else 0


class AppMetrics:
    """One app's registry and request metrics."""

    def __init__(self, engine: sa.Engine, leases: Callable[[], LeaseCounters | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ratebench_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "ratebench_http_request_duration_seconds",
            "time to answer an HTTP request, by route template",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(StudyCollector(engine, leases))

    def render(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format `accept` asks for (Prometheus text by default, or
        OpenMetrics) and its content type; queries the database, so call it in a thread."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)


class RequestMetrics:
    """ASGI middleware counting each request by its route's template, once it is answered.

    Outermost, so that the refusals of other middleware (413, 422) count too; a request whose
    handler raised counts as the 500 the server answers."""

    def __init__(self, app: ASGIApp, metrics: AppMetrics) -> None:
        self.app, self.metrics = app, metrics
        self._templates: dict[int, str] | None = None  # id(route) -> its full template

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") == METRICS_PATH:
            await self.app(scope, receive, send)
            return
        status = 500
        start = time.perf_counter()

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            method = scope.get("method", "")
            self.metrics.observe(
                method if method in METHODS else "other",
                self._route(scope),
                status,
                time.perf_counter() - start,
            )

    def _route(self, scope: Scope) -> str:
        """The full template of the route that answered, not the raw path. The router names
        the route in the scope as its router declared it, without the prefixes it was
        included under, so the full template is looked up among the app's routes."""
        route = scope.get("route")
        if route is None:
            return "unmatched"
        if self._templates is None:
            self._templates = _templates(scope["app"].routes)
        template = self._templates.get(id(route)) or getattr(route, "path_format", None)
        return template if isinstance(template, str) else "unmatched"


def _templates(routes: list[BaseRoute]) -> dict[int, str]:
    """Each route's full template (prefixes included), by the route's identity."""
    templates: dict[int, str] = {}
    for context in iter_route_contexts(routes):
        if context.path_format is not None:
            templates.setdefault(id(context.original_route), context.path_format)
    return templates
