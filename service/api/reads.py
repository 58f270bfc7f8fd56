"""The reads every study endpoint shares: the study as this reader may see it
(`service.privacy`), and what a whole-study answer is built from (`StudyView`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.api.deps import Tx
from service.models import StudyRecord, StudyStatus
from service.optuna_tables import trials_version
from service.privacy import check_readable, owns_study, public_environment, public_spec
from service.schemas import StudyOut
from worker.spec import StudySpec

__all__ = ["StudyView", "readable_study", "study_out", "study_view"]


def readable_study(tx: Tx, study_id: str) -> StudyRecord:
    """The study, or 404 when there is none or the caller may not read it."""
    study = tx.session.get(StudyRecord, study_id)
    return check_readable(study, study_id, tx.key, tx.settings.private_studies)


def study_out(study: StudyRecord, tx: Tx) -> StudyOut:
    """The study as its reader may see it: whole for its owner and admins, else without its
    data folder and the hosts it ran on (`service.privacy`)."""
    out = StudyOut.model_validate(study)
    if not owns_study(study.api_key_id, tx.key):
        out.spec = public_spec(out.spec)
        out.environment = public_environment(out.environment)
    return out


@dataclass(frozen=True)
class StudyView:
    """What a whole-study answer is built from, read in the request's database work: the
    spec, whether the reader owns the study, and the version of its state (the cache key)."""

    study_id: str
    spec: StudySpec
    owner: bool
    version: tuple[Any, ...]


def study_view(tx: Tx, study_id: str) -> StudyView:
    """The study's `StudyView` for this reader (404 when it may not read it)."""
    study = readable_study(tx, study_id)
    finished = StudyStatus(study.status).finished
    trials = None if finished else trials_version(tx.session, study_id)
    version = (study_id, study.status, study.finished_at, trials)
    spec = StudySpec.from_stored(study.spec)
    return StudyView(study_id, spec, owns_study(study.api_key_id, tx.key), version)
