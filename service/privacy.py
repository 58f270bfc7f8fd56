"""Who may read a study, and what a reader who does not own it sees of it.

Reading. By default every reader (every key, and anonymous readers where
`RATEBENCH_ANONYMOUS_READS` is on) reads every study. With `RATEBENCH_PRIVATE_STUDIES=true` a
key reads its own studies and those their owners marked `public`, an admin key reads all, and
an anonymous reader only the public ones; a study the reader may not read is answered 404, as
one that does not exist, so its id tells nothing. Task leaderboards and the profile pool only
the studies the reader may read (`readable`).

Owner-only fields. Whoever reads a study that is not their own (not its key, not an admin)
sees it without where it ran and where its data lie: `spec.data.data_dir` reads `<hidden>`;
the environment loses the host name, and each node its host name, address and Ray node id
(`NODE_FIELDS`); a trial loses its `host` and `pid` attributes and its node the same fields.
The rest (versions, CPU and GPU models, every result) stays: it is what makes a result
reproducible.
"""

from __future__ import annotations

import copy
from typing import Any

import sqlalchemy as sa
from fastapi import HTTPException, status

from service.models import ApiKey, StudyRecord

__all__ = [
    "HIDDEN",
    "NODE_FIELDS",
    "check_readable",
    "owns_study",
    "public_environment",
    "public_spec",
    "public_trial_attrs",
    "readable",
]

HIDDEN = "<hidden>"
NODE_FIELDS = ("hostname", "ip", "ray_node_id")
TRIAL_HOST_ATTRS = ("host", "pid")


def owns_study(owner_id: int | None, key: ApiKey | None) -> bool:
    """Whether `key` sees everything of a study submitted by `owner_id`."""
    return key is not None and (key.is_admin or (owner_id is not None and key.id == owner_id))


def readable(key: ApiKey | None, private: bool) -> sa.ColumnElement[bool]:
    """The studies `key` (None: anonymous) may read, as a condition on `StudyRecord`."""
    if not private or (key is not None and key.is_admin):
        return sa.true()
    if key is None:
        return StudyRecord.public.is_(True)
    return sa.or_(StudyRecord.public.is_(True), StudyRecord.api_key_id == key.id)


def check_readable(
    study: StudyRecord | None, study_id: str, key: ApiKey | None, private: bool
) -> StudyRecord:
    """The study, or 404 when there is none or `key` may not read it (the same answer)."""
    hidden = (
        study is not None and private and not study.public and not owns_study(study.api_key_id, key)
    )
    if study is None or hidden:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail=f"no study {study_id!r}")
    return study


def _public_node(node: Any) -> Any:
    if not isinstance(node, dict):
        return node
    return {k: v for k, v in node.items() if k not in NODE_FIELDS}


def public_environment(environment: dict[str, Any] | None) -> dict[str, Any] | None:
    """The environment without host names, node addresses and Ray node ids."""
    if environment is None:
        return None
    shown = {k: v for k, v in environment.items() if k != "hostname"}
    if isinstance(shown.get("nodes"), list):
        shown["nodes"] = [_public_node(node) for node in shown["nodes"]]
    return shown


def public_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec with `data.data_dir` hidden when it names one."""
    data = spec.get("data")
    if not isinstance(data, dict) or data.get("data_dir") is None:
        return spec
    shown = copy.copy(spec)
    shown["data"] = {**data, "data_dir": HIDDEN}
    return shown


def public_trial_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """A trial's user attributes without the host and process it ran in."""
    shown = {k: v for k, v in attrs.items() if k not in TRIAL_HOST_ATTRS}
    if "node" in shown:
        shown["node"] = _public_node(shown["node"])
    return shown
