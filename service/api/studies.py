"""`/studies`: submit, list, follow, cancel, and read a study's trials (JSON pages or one CSV
file) and leaderboard. The JSON bundle of a whole study is `service.api.export`'s.

Each endpoint is `async def` and does all its database work in one function (`_submit`,
`_list`, …) that `Db.run` calls in a database thread with its own session, the API-key check
included, committed before the endpoint answers: a client that was told a study exists can
read it at once.

A submit checks the key (and its request rate) before anything costly: only then is the body
validated as a `StudySpec` (up to ~33 model builds on the meta device, in a few threads of
their own and within `RATEBENCH_MAX_VALIDATION_S`), its data folder, compute budget and step
cost checked (`service.admission`, paths in its answers redacted), and Ray asked for its nodes.

Reads go through `service.privacy`: a study the reader may not read is a 404, and one it does
not own is shown without its data folder, host names and addresses. `trials.csv` and `export`
are cached per study state and view (`service.response_cache`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Annotated, Any, Literal

import sqlalchemy as sa
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import PlainValidator, ValidationError

from service import queue, response_cache
from service.admission import admission_problems
from service.api.deps import Db, RayDep, ReadDb, Tx, WriteDb, in_thread
from service.api.reads import StudyView, readable_study, study_out, study_view
from service.config import Settings
from service.export import trial_csv
from service.leaderboards import study_arms
from service.models import ArmResult, StudyRecord, StudyStatus
from service.optuna_tables import trial_page
from service.privacy import owns_study, public_trial_attrs, readable
from service.ray_runtime import RayRuntime
from service.schemas import Page, StudyLeaderboard, StudyOut, SubmittedStudy, TrialOut
from worker.fit import cluster_fit_problem
from worker.report.stats import seed_warning
from worker.spec import StudySpec
from worker.tasks import Task, get_task
from worker.tasks.registry import OWN_DISTRIBUTION

router = APIRouter(prefix="/studies", tags=["studies"])
log = logging.getLogger(__name__)

Limit = Annotated[int, Query(ge=1, le=200, description="page size")]
Offset = Annotated[int, Query(ge=0, le=2**63 - 1, description="items to skip")]


def _object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("must be a JSON object: a study spec")
    return value


# The body of a submit, parsed but not yet validated: it is validated as a StudySpec (whose
# schema the OpenAPI document shows) only once the key is known.
SubmittedSpec = Annotated[dict[str, Any], PlainValidator(_object, json_schema_input_type=StudySpec)]


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    response_model=SubmittedStudy,
    responses={
        401: {"description": "missing or invalid API key"},
        409: {"description": "the Idempotency-Key was used by this key with another body"},
        413: {"description": "body too large"},
        422: {
            "description": "invalid spec, over the compute budget, a step over the memory or "
            "FLOPs limits, a validation over its time, or a trial larger than any node of the "
            "Ray cluster; `detail` gives each field path and the problem"
        },
        429: {
            "description": "this key has as many queued studies as it may, or sent too many "
            "requests; `Retry-After` says when to try again"
        },
        503: {"description": "the database is unavailable; retry after `Retry-After` seconds"},
    },
)
async def submit_study(
    body: SubmittedSpec,
    db: WriteDb,
    ray: RayDep,
    request: Request,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            max_length=200,
            description="a retried request with the same key returns the "
            "study the first one created",
        ),
    ] = None,
    public: Annotated[
        bool,
        Query(description="readable by every key where studies are private (default: no)"),
    ] = False,
) -> SubmittedStudy:
    """Queue a study. Returns 202 with its id once it is stored; `Location` points at it."""
    await db.authorize()  # the key and its rate, before any costly check
    spec = await in_thread(request, "validate", admit, body, db.settings)
    await _check_node_fit(spec, ray, request)
    await _check_plugin_on_nodes(spec, get_task(spec.task), ray, request, db)
    study_id, study_status, created = await db.run_again(_submit, spec, idempotency_key, public)
    location = str(request.url_for("get_study", study_id=study_id).path)
    response.headers["Location"] = location
    if not created:
        response.status_code = status.HTTP_200_OK
    warnings = [w for w in (seed_warning(spec.budget.final_seeds),) if w]
    return SubmittedStudy(
        id=study_id, status=study_status, created=created, location=location, warnings=warnings
    )


def admit(body: dict[str, Any], settings: Settings) -> StudySpec:
    """`body` validated as a StudySpec and admitted by `service.admission` (its data under the
    roots, and a files dataset's every array readable; the budget; a step's memory and FLOPs),
    within `settings.max_validation_s`; a 422 naming every bad field otherwise."""
    deadline = time.monotonic() + settings.max_validation_s
    try:
        spec = StudySpec.model_validate(body, context={"deadline": deadline})
    except ValidationError as exc:
        errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
        raise RequestValidationError(errors) from None
    problems = admission_problems(spec, settings, redact=True, deadline=deadline)
    if problems:
        raise RequestValidationError(
            [{"type": kind, "loc": ("body", *loc), "msg": msg} for loc, msg, kind in problems]
        )
    return spec


async def _check_plugin_on_nodes(
    spec: StudySpec, task: Task, ray: RayRuntime, request: Request, db: Db
) -> None:
    """A 422 at `task` when a node of the Ray cluster this API is connected to lacks the plugin
    task's package or has another version (`worker.plugin_nodes`); ratebench's own tasks, and
    an API that is not connected, are not asked about (the trials check for themselves)."""
    if not ray.connected or task.package in (None, OWN_DISTRIBUTION) or task.version is None:
        return
    from worker.plugin_nodes import cluster_package_problem

    await db.authorize()
    try:
        problem = await in_thread(
            request, "heavy", ray.ask, cluster_package_problem, task.package, task.version,
            task.name,
        )  # fmt: skip
    except Exception:  # an unreachable cluster: the trials' own check decides later
        log.warning("could not ask the Ray nodes for %s", task.package, exc_info=True)
        return
    if problem is not None:
        error = {"type": "spec", "loc": ("body", "task"), "msg": problem}
        raise RequestValidationError([error])


async def _check_node_fit(spec: StudySpec, ray: RayRuntime, request: Request) -> None:
    """A 422 at `resources.cpus_per_trial` or `gpus_per_trial` when no alive node of the Ray
    cluster this API is connected to (as the scheduler it runs) can hold one trial
    (`worker.fit`), once the nodes have reported their resources. An API that does not run
    the scheduler is not connected and cannot tell: the scheduler's own check then waits for
    a node that fits (`RATEBENCH_NODE_WAIT_S`) and fails the study with the same message if
    none comes."""
    if not ray.connected:
        return
    res = spec.resources
    try:
        problem = await in_thread(
            request, "health", ray.ask, cluster_fit_problem, res.cpus_per_trial,
            res.gpus_per_trial,
        )  # fmt: skip
    except Exception:  # an unreachable cluster: the scheduler's check decides later
        log.warning("could not read the Ray cluster's nodes for a submit", exc_info=True)
        return
    if problem is not None:
        error = {"type": "spec", "loc": ("body", "resources", problem.field), "msg": str(problem)}
        raise RequestValidationError([error])


def _submit(
    tx: Tx, spec: StudySpec, idempotency_key: str | None, public: bool
) -> tuple[str, str, bool]:
    study, created = queue.submit(
        tx.session,
        spec.model_dump(mode="json"),
        name=spec.name,
        task=spec.task,
        idempotency_key=idempotency_key,
        api_key_id=tx.caller.id,
        limits=queue.KeyLimits(tx.settings.max_queued_per_key, tx.settings.max_running_per_key),
        public=public,
    )
    return study.id, study.status, created


@router.get("", response_model=Page[StudyOut])
async def list_studies(
    db: ReadDb,
    limit: Limit = 50,
    offset: Offset = 0,
    status_filter: Annotated[StudyStatus | None, Query(alias="status")] = None,
    task: str | None = None,
) -> Page[StudyOut]:
    """Newest first; filter by `status` and `task`."""
    return await db.run(_list, limit, offset, status_filter, task)


def _list(
    tx: Tx, limit: int, offset: int, status_filter: StudyStatus | None, task: str | None
) -> Page[StudyOut]:
    query = sa.select(StudyRecord).where(readable(tx.key, tx.settings.private_studies))
    if status_filter is not None:
        query = query.where(StudyRecord.status == status_filter.value)
    if task is not None:
        query = query.where(StudyRecord.task == task)
    total = tx.session.scalar(sa.select(sa.func.count()).select_from(query.subquery())) or 0
    rows = tx.session.scalars(
        query.order_by(StudyRecord.created_at.desc()).limit(limit).offset(offset)
    )
    items = [study_out(row, tx) for row in rows]
    return Page[StudyOut](items=items, total=total, limit=limit, offset=offset)


@router.get("/{study_id}", response_model=StudyOut, responses={404: {}})
async def get_study(study_id: str, db: ReadDb) -> StudyOut:
    """Status, per-arm progress, timestamps and errors."""
    return await db.run(_get, study_id)


def _get(tx: Tx, study_id: str) -> StudyOut:
    from worker.summary import edge_warnings

    study = study_out(readable_study(tx, study_id), tx)
    rows = tx.session.scalars(sa.select(ArmResult.summary).where(ArmResult.study_id == study_id))
    study.warnings = edge_warnings(list(rows))
    return study


@router.post("/{study_id}/cancel", response_model=StudyOut, responses={403: {}, 404: {}, 409: {}})
async def cancel_study(study_id: str, db: WriteDb) -> StudyOut:
    """Cancel: a queued study at once; a running one stops its trials promptly and keeps the
    results so far. Only the key that submitted the study, or an admin key, may cancel it
    (403 otherwise). Cancelling a finished study is a 409."""
    return await db.run(_cancel, study_id)


def _cancel(tx: Tx, study_id: str) -> StudyOut:
    study = readable_study(tx, study_id)
    queue.check_owner(study, tx.caller)
    if StudyStatus(study.status).finished:
        raise HTTPException(
            status.HTTP_409_CONFLICT, detail=f"study {study_id} already {study.status}"
        )
    queue.request_cancel(tx.session, study)
    return study_out(study, tx)


@router.post("/{study_id}/visibility", response_model=StudyOut, responses={403: {}, 404: {}})
async def set_visibility(
    study_id: str,
    db: WriteDb,
    public: Annotated[bool, Query(description="true: every key may read it")],
) -> StudyOut:
    """Mark a study public (readable by every key, and by anonymous readers where those may
    read, when `RATEBENCH_PRIVATE_STUDIES` is on) or private again. Only the key that
    submitted it, or an admin key, may (403 otherwise)."""
    return await db.run(_set_visibility, study_id, public)


def _set_visibility(tx: Tx, study_id: str, public: bool) -> StudyOut:
    study = readable_study(tx, study_id)
    queue.check_owner(study, tx.caller)
    study.public = public
    tx.session.flush()
    return study_out(study, tx)


@router.get("/{study_id}/trials", response_model=Page[TrialOut], responses={404: {}})
async def list_trials(
    study_id: str,
    db: ReadDb,
    limit: Limit = 50,
    offset: Offset = 0,
    arm: str | None = None,
) -> Page[TrialOut]:
    """Every trial of every arm (sweep and final seeds), with params, per-epoch metrics and
    state, ordered by arm then trial number."""
    return await db.run(_trials, study_id, arm, limit, offset)


@router.get(
    "/{study_id}/trials.csv",
    response_class=Response,
    responses={200: {"content": {"text/csv": {}}}, 404: {}},
)
async def trials_csv(
    study_id: str,
    db: ReadDb,
    request: Request,
    form: Annotated[
        Literal["wide", "long"],
        Query(
            description="`wide`: one row per trial, its history as `epoch_<n>_<metric>` "
            "columns; `long`: one row per trial × epoch × metric"
        ),
    ] = "wide",
    arm: str | None = None,
) -> Response:
    """Every trial (or one arm's) as CSV: arm, role, trial number, state and outcome
    (complete, pruned, diverged, failed), objective, duration, seed, one `param_<name>` column
    per hyperparameter, test metrics, error, and the per-epoch history (`service.export`).
    Built once per state of the study's trials and view (`service.response_cache`)."""
    view = await db.run(study_view, study_id)
    url = db.settings.resolved_database_url()
    key = ("csv", url, view.version, view.owner, arm, form)
    text, made = await in_thread(request, "heavy", response_cache.cache.get_or_make, key,
                                 lambda: _csv(url, study_id, view, arm, form))  # fmt: skip
    filename = f"{study_id}-trials{'' if form == 'wide' else '-long'}.csv"
    return Response(
        text,
        media_type="text/csv; charset=utf-8",
        headers={
            "Content-Disposition": f'attachment; filename="{filename}"',
            "X-Cache": "miss" if made else "hit",
        },
    )


def _csv(
    url: str, study_id: str, view: StudyView, arm: str | None, form: Literal["wide", "long"]
) -> bytes:
    from worker.results import load_trials

    trials = load_trials(url, study_id, view.spec, arm=arm)
    if not view.owner:
        trials = [replace(t, user_attrs=public_trial_attrs(t.user_attrs)) for t in trials]
    return trial_csv(trials, form).encode()


def _trials(tx: Tx, study_id: str, arm: str | None, limit: int, offset: int) -> Page[TrialOut]:
    """One page, read in SQL from Optuna's tables in this request's session
    (`service.optuna_tables`): its cost does not grow with the study."""
    study = readable_study(tx, study_id)
    spec = StudySpec.from_stored(study.spec)
    page = trial_page(tx.session, study_id, spec.labels, arm, limit, offset)
    if not owns_study(study.api_key_id, tx.key):
        for item in page.items:
            item.user_attrs = public_trial_attrs(item.user_attrs)
            item.node = public_trial_attrs({"node": item.node})["node"]
    return page


@router.get("/{study_id}/leaderboard", response_model=StudyLeaderboard, responses={404: {}})
async def study_leaderboard(study_id: str, db: ReadDb) -> StudyLeaderboard:
    """The study's arms ranked by the mean objective over the final seeds (stored when the
    study ends; empty while it runs)."""
    return await db.run(_leaderboard, study_id)


def _leaderboard(tx: Tx, study_id: str) -> StudyLeaderboard:
    study = readable_study(tx, study_id)
    rows = tx.session.scalars(
        sa.select(ArmResult).where(ArmResult.study_id == study.id).order_by(ArmResult.rank)
    )
    arms = study_arms(list(rows))
    return StudyLeaderboard(study_id=study.id, status=study.status, arms=arms)
