"""Every read of Optuna's own tables by the service, in one place: a page of a study's trials,
the trials' version (what the plot caches key on) and the machines the trials ran on.

Optuna's schema is private (`optuna.storages._rdb.models`): the tables are declared here, with
only the columns read, and `tests/service/test_optuna_tables.py` pins them against the
installed Optuna's schema and fails when another module of ours declares or queries them. A
study's Optuna studies are found by the naming rule `worker.arms.base` owns
(`sweep_study_name`, `final_study_name`, `study_name_prefix`). The worker reads and writes
Optuna only through Optuna's public storage API.

Trial pages. `GET /studies/{id}/trials` used to open an Optuna storage per request, load every
trial of every arm and slice the list in Python: its cost grew with the study. Here a page
costs the same whatever the study's size, in the request's own session (Optuna's tables sit
beside ratebench's in the one database):

1. the arms' Optuna studies (`<study key>/<label>`, `…/final`) by name, with their trial
   counts (one `GROUP BY`; `trials.study_id` is indexed by Optuna): the total, and which
   studies the page `[offset, offset + limit)` falls in;
2. the page's trial rows, one `LIMIT/OFFSET` part per Optuna study it spans, in one query;
3. their params, values and user attributes: one query per child table over the page's trial
   ids (never one per trial).

Order and content are those of `worker.results.load_trials` (arms in the spec's order, each
arm's sweep then its final seeds, each by `trial_id` as Optuna's `get_all_trials` orders
them), as `TrialOut` shows them: intermediate values and system attributes are not part of
`TrialOut`, so they are not read.
"""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

import sqlalchemy as sa
from optuna.distributions import BaseDistribution, json_to_distribution
from sqlalchemy.orm import Session

from service.schemas import Page, TrialOut
from worker.arms.base import FINAL, SWEEP, final_study_name, study_name_prefix, sweep_study_name

__all__ = [
    "MAX_NODES",
    "OPTUNA_TABLES",
    "TrialsVersion",
    "trial_nodes",
    "trial_page",
    "trials_version",
]

OPTUNA_TABLES = sa.MetaData()

studies = sa.Table(
    "studies", OPTUNA_TABLES,
    sa.Column("study_id", sa.Integer, primary_key=True),
    sa.Column("study_name", sa.String(512)),
)  # fmt: skip
trials = sa.Table(
    "trials", OPTUNA_TABLES,
    sa.Column("trial_id", sa.Integer, primary_key=True),
    sa.Column("number", sa.Integer),
    sa.Column("study_id", sa.Integer),
    sa.Column("state", sa.String(8)),  # Optuna's Enum(TrialState) stores the member's name
    sa.Column("datetime_start", sa.DateTime),  # naive UTC
    sa.Column("datetime_complete", sa.DateTime),
)  # fmt: skip
trial_params = sa.Table(
    "trial_params", OPTUNA_TABLES,
    sa.Column("param_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer),
    sa.Column("param_name", sa.String(512)),
    sa.Column("param_value", sa.Float),  # the distribution's internal representation
    sa.Column("distribution_json", sa.Text),
)  # fmt: skip
trial_values = sa.Table(
    "trial_values", OPTUNA_TABLES,
    sa.Column("trial_value_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer),
    sa.Column("objective", sa.Integer),
    sa.Column("value", sa.Float),  # NULL for ±inf, told by value_type
    sa.Column("value_type", sa.String(7)),  # FINITE, INF_POS, INF_NEG
)  # fmt: skip
trial_user_attributes = sa.Table(
    "trial_user_attributes", OPTUNA_TABLES,
    sa.Column("trial_user_attribute_id", sa.Integer, primary_key=True),
    sa.Column("trial_id", sa.Integer),
    sa.Column("key", sa.String(512)),
    sa.Column("value_json", sa.Text),
)  # fmt: skip

_INFINITE = {"INF_POS": float("inf"), "INF_NEG": float("-inf")}
_ready: set[str] = set()  # databases seen with Optuna's tables (they are never dropped)


def _has_optuna_tables(session: Session) -> bool:
    """Whether Optuna has created its tables yet (not before a study first ran): a queued
    study on a fresh database has no trials rather than an error."""
    url = session.get_bind().engine.url.render_as_string(hide_password=True)
    if url not in _ready and sa.inspect(session.connection()).has_table("trials"):
        _ready.add(url)
    return url in _ready


@lru_cache(maxsize=1024)
def _distribution(text: str) -> BaseDistribution:
    """A stored distribution, parsed once per distinct JSON (a sweep has a handful)."""
    return json_to_distribution(text)


def _aware(value: datetime | None) -> datetime | None:
    """Optuna's naive UTC as this machine's local time with its offset, as the API's other
    timestamps have theirs."""
    return None if value is None else value.replace(tzinfo=UTC).astimezone()


def trial_page(
    session: Session,
    study_key: str,
    labels: list[str],
    arm: str | None,
    limit: int,
    offset: int,
) -> Page[TrialOut]:
    """Trials `offset … offset + limit - 1` of study `study_key` (one arm's when `arm` is
    given; arms in `labels`' order), and how many there are in all."""
    segments = [
        (label, role, name(study_key, label))
        for label in labels
        if arm is None or label == arm
        for role, name in ((SWEEP, sweep_study_name), (FINAL, final_study_name))
    ]
    empty = Page[TrialOut](items=[], total=0, limit=limit, offset=offset)
    if not segments or not _has_optuna_tables(session):
        return empty
    names = [name for _, _, name in segments]
    ids: dict[str, int] = {}
    counts: dict[int, int] = {}
    for name, study_id, n in session.execute(
        sa.select(studies.c.study_name, studies.c.study_id, sa.func.count(trials.c.trial_id))
        .outerjoin(trials, trials.c.study_id == studies.c.study_id)
        .where(studies.c.study_name.in_(names))
        .group_by(studies.c.study_id, studies.c.study_name)
    ):
        ids[name], counts[study_id] = study_id, n
    if not ids:
        return empty
    total = sum(counts.values())
    # which Optuna studies the page falls in, and the slice of each
    where: dict[int, tuple[int, str, str]] = {}  # study_id -> (position, label, role)
    parts: list[sa.Select[Any]] = []
    skip, want = offset, limit
    for position, (label, role, name) in enumerate(segments):
        study_id = ids.get(name)
        n = counts.get(study_id, 0) if study_id is not None else 0
        if want == 0:
            break
        if study_id is None or skip >= n:
            skip -= min(skip, n)
            continue
        take = min(n - skip, want)
        where[study_id] = (position, label, role)
        part = (
            sa.select(trials)
            .where(trials.c.study_id == study_id)
            .order_by(trials.c.trial_id)
            .limit(take)
            .offset(skip)
            .subquery()
        )
        parts.append(sa.select(part))
        skip, want = 0, want - take
    if not parts:
        return Page[TrialOut](items=[], total=total, limit=limit, offset=offset)
    query = parts[0] if len(parts) == 1 else sa.union_all(*parts)
    rows = sorted(
        session.execute(query).mappings(),
        key=lambda r: (where[r["study_id"]][0], r["trial_id"]),
    )
    trial_ids = [r["trial_id"] for r in rows]
    params, values, attrs = _children(session, trial_ids)
    items = []
    for r in rows:
        _, label, role = where[r["study_id"]]
        user_attrs = attrs.get(r["trial_id"], {})
        items.append(
            TrialOut(
                arm=label, role=role, number=r["number"], state=r["state"],
                outcome=user_attrs.get("outcome"), value=values.get(r["trial_id"]),
                params=params.get(r["trial_id"], {}), user_attrs=user_attrs,
                datetime_start=_aware(r["datetime_start"]),
                datetime_complete=_aware(r["datetime_complete"]),
                node=_node(user_attrs.get("node")),
            )
        )  # fmt: skip
    return Page[TrialOut](items=items, total=total, limit=limit, offset=offset)


def _node(value: Any) -> dict[str, Any] | None:
    """The trial's `node` attribute when it is the record `worker.environment.node` writes."""
    return value if isinstance(value, dict) else None


def _children(
    session: Session, trial_ids: list[int]
) -> tuple[dict[int, dict[str, Any]], dict[int, float | None], dict[int, dict[str, Any]]]:
    """The trials' params (external representation), objective values and user attributes:
    one query per table."""
    params: dict[int, dict[str, Any]] = defaultdict(dict)
    for trial_id, name, value, distribution in session.execute(
        sa.select(
            trial_params.c.trial_id, trial_params.c.param_name, trial_params.c.param_value,
            trial_params.c.distribution_json,
        )
        .where(trial_params.c.trial_id.in_(trial_ids))
        .order_by(trial_params.c.param_id)
    ):  # fmt: skip
        params[trial_id][name] = _distribution(distribution).to_external_repr(value)
    values: dict[int, float | None] = {}
    for trial_id, value, value_type in session.execute(
        sa.select(trial_values.c.trial_id, trial_values.c.value, trial_values.c.value_type).where(
            trial_values.c.trial_id.in_(trial_ids), trial_values.c.objective == 0
        )
    ):
        values[trial_id] = _INFINITE.get(value_type, value)
    attrs: dict[int, dict[str, Any]] = defaultdict(dict)
    for trial_id, key, value_json in session.execute(
        sa.select(
            trial_user_attributes.c.trial_id, trial_user_attributes.c.key,
            trial_user_attributes.c.value_json,
        )
        .where(trial_user_attributes.c.trial_id.in_(trial_ids))
        .order_by(trial_user_attributes.c.trial_user_attribute_id)
    ):  # fmt: skip
        attrs[trial_id][key] = json.loads(value_json)
    return params, values, attrs


# -- the trials' version and their machines -----------------------------------------------------

TrialsVersion = tuple[int, int, datetime | None]  # (trials, finished trials, latest finish)
MAX_NODES = 100  # a study's environment lists at most this many distinct machines


def _of_study(study_key: str) -> sa.ColumnElement[bool]:
    """Trials of any of the study's Optuna studies (every arm, sweep and final)."""
    return studies.c.study_name.startswith(study_name_prefix(study_key), autoescape=True)


def trials_version(session: Session, study_key: str) -> TrialsVersion:
    """How many trials the study has, how many finished, and when the latest did: it changes
    whenever a trial starts or ends; (0, 0, None) before any trial."""
    if not _has_optuna_tables(session):
        return 0, 0, None  # no study has run in this database yet
    count, done, last = session.execute(
        sa.select(
            sa.func.count(trials.c.trial_id),
            sa.func.count(trials.c.datetime_complete),
            sa.func.max(trials.c.datetime_complete),
        )
        .select_from(trials.join(studies, studies.c.study_id == trials.c.study_id))
        .where(_of_study(study_key))
    ).one()
    return int(count), int(done), last


def trial_nodes(session: Session, study_key: str) -> list[dict[str, Any]]:
    """The distinct machines the study's trials ran on (their `node` attribute, set by
    `worker.remote`), in one query; [] before any trial ran."""
    if not _has_optuna_tables(session):
        return []
    attrs = trial_user_attributes.c
    values = session.scalars(
        sa.select(attrs.value_json)
        .distinct()
        .select_from(
            trial_user_attributes.join(trials, trials.c.trial_id == attrs.trial_id).join(
                studies, studies.c.study_id == trials.c.study_id
            )
        )
        .where(attrs.key == "node", _of_study(study_key))
    )
    nodes: dict[str, dict[str, Any]] = {}
    for value in values:
        node = json.loads(value)
        if isinstance(node, dict):
            nodes.setdefault(json.dumps(node, sort_keys=True), node)
    return [nodes[key] for key in sorted(nodes)][:MAX_NODES]
