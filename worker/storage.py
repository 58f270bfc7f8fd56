"""The Optuna storage the worker opens: one `RDBStorage` per driver, with a bounded pool.

Only the driver of a study (`worker.sweep.run_study`) and readers (`worker.summary`,
`worker.results`) open storage; Ray tasks never do (see `worker.sweep` for why). Each open
storage holds at most `POOL_SIZE + MAX_OVERFLOW` connections, and the driver uses them from one
thread, so a running study costs PostgreSQL at most that many connections however many trials
run at once. SQLite waits up to `SQLITE_TIMEOUT_S` for a lock held by another process (e.g. the
service writing its own tables) instead of failing at once.

Optuna is imported when a storage is opened, not with this module: `make_sqlite_folder` is all
that `service.db` needs, and every command that opens ratebench's own tables (`ratebench keys`,
`import`, a re-run of a finished study) would otherwise pay Optuna's import (seconds).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa

if TYPE_CHECKING:
    from optuna.storages import RDBStorage
    from optuna.trial import FrozenTrial

__all__ = [
    "MAX_OVERFLOW",
    "POOL_SIZE",
    "SQLITE_TIMEOUT_S",
    "make_sqlite_folder",
    "open_storage",
    "study_trials",
]

POOL_SIZE = 1
MAX_OVERFLOW = 1
SQLITE_TIMEOUT_S = 60.0
_CREATE_ATTEMPTS = 5


def _lost_creation_race(exc: sa.exc.DBAPIError) -> bool:
    """Two processes created Optuna's tables at once on a fresh database (e.g. the service
    reading while a driver starts): a table "already exists" or a row is duplicated. The other
    process is finishing the job, so trying again finds the tables."""
    return isinstance(exc, sa.exc.IntegrityError) or "already exists" in str(exc.orig)


def make_sqlite_folder(url: str) -> None:
    """Create the folder of a SQLite file URL when missing (SQLite creates the file, not its
    folder), so that the default `sqlite:///data/ratebench.db` works from a fresh clone
    whichever process opens it first. Other URLs are left alone."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


def open_storage(url: str) -> RDBStorage:
    """An Optuna RDB storage on `url` (tables created when missing); dispose its engine after."""
    import optuna
    from optuna.storages import RDBStorage

    # Optuna logs each finished trial at INFO level; ratebench's driver logs what matters.
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    kwargs: dict[str, Any]
    make_sqlite_folder(url)
    if url.startswith("sqlite"):
        kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    else:
        kwargs = {"pool_size": POOL_SIZE, "max_overflow": MAX_OVERFLOW, "pool_pre_ping": True}
    for attempt in range(1, _CREATE_ATTEMPTS + 1):
        try:
            return RDBStorage(url, engine_kwargs=kwargs)
        except (sa.exc.IntegrityError, sa.exc.OperationalError, sa.exc.ProgrammingError) as exc:
            if attempt == _CREATE_ATTEMPTS or not _lost_creation_race(exc):
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def study_trials(storage: RDBStorage, name: str) -> list[FrozenTrial]:
    """Every trial of the study called `name`, or [] when there is no such study (yet)."""
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return []
    return storage.get_all_trials(study_id, deepcopy=False)
