"""Study plots for the API and the web page, rendered once per state of the study's trials.

A plot depends only on the study's spec and trials, so it is drawn again only when they
changed. `plot_source` reads, with the study row, the trials' *version*: how many trials the
study's Optuna studies hold, how many have finished, and the latest finish time (one aggregate
query on Optuna's `studies` and `trials` tables, in the same database). A trial's result is
stored before Optuna sets its finish time, so a new result always changes the version.

- A running study's plots are kept in memory under that version (the newest `MEMORY_ENTRIES`
  plots): its page refreshes every few seconds, and only a refresh after a trial finished
  draws again.
- A finished study's trials never change: its plots are written once to
  `<data_dir>/plots/<study id>/<kind>.<fmt>` (atomically, so another process never reads half
  a file) and served from there.
- Concurrent first requests for the same plot wait for one render (a lock per plot, from a
  fixed set of stripes) instead of each drawing it; renders themselves hold matplotlib's lock
  (`worker.report.plots`), since matplotlib is not thread-safe.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from service.models import StudyRecord, StudyStatus
from service.optuna_tables import TrialsVersion, trials_version
from worker.report import plots
from worker.results import load_trials
from worker.spec import StudySpec

__all__ = [
    "FORMATS",
    "KINDS",
    "MEMORY_ENTRIES",
    "Plot",
    "PlotSource",
    "plot_source",
    "study_plot",
]

logger = logging.getLogger(__name__)

KINDS = tuple(plots.PLOTS)
FORMATS = plots.FORMATS
MEMORY_ENTRIES = 256
_STRIPES = 64

Version = TrialsVersion


@dataclass(frozen=True)
class PlotSource:
    """What a study's plots are drawn from, read in the request's database work."""

    study_id: str
    spec: dict[str, Any]
    finished: bool
    version: Version  # (trials, finished trials, latest finish); (0, 0, None) before any


@dataclass(frozen=True)
class Plot:
    content: bytes
    rendered: bool  # False when served from a cache


def plot_source(session: Session, study_id: str) -> PlotSource | None:
    """The study's spec, whether it finished, and its trials' version; None for no study."""
    study = session.get(StudyRecord, study_id)
    if study is None:
        return None
    finished = StudyStatus(study.status).finished
    version = (0, 0, None) if finished else trials_version(session, study_id)
    return PlotSource(study.id, dict(study.spec), finished, version)


_guard = threading.Lock()
_memory: OrderedDict[tuple[str, str, str], tuple[Version, bytes]] = OrderedDict()
_stripes = [threading.Lock() for _ in range(_STRIPES)]


def _path(data_dir: Path, key: tuple[str, str, str]) -> Path:
    study_id, kind, fmt = key
    return data_dir / "plots" / study_id / f"{kind}.{fmt}"


def _cached(source: PlotSource, key: tuple[str, str, str], data_dir: Path) -> bytes | None:
    if source.finished:
        path = _path(data_dir, key)
        return path.read_bytes() if path.is_file() else None
    with _guard:
        entry = _memory.get(key)
        if entry is None or entry[0] != source.version:
            return None
        _memory.move_to_end(key)
        return entry[1]


def _store(source: PlotSource, key: tuple[str, str, str], content: bytes, data_dir: Path) -> None:
    if source.finished:
        path = _path(data_dir, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
        partial.write_bytes(content)
        os.replace(partial, path)
        with _guard:
            _memory.pop(key, None)
        return
    with _guard:
        _memory[key] = (source.version, content)
        _memory.move_to_end(key)
        while len(_memory) > MEMORY_ENTRIES:
            _memory.popitem(last=False)


def study_plot(source: PlotSource, kind: str, fmt: str, storage_url: str, data_dir: Path) -> Plot:
    """The plot `kind` of the study as `fmt` bytes, drawn only when its trials changed since
    the last drawing (ValueError for an unknown kind or format)."""
    if kind not in plots.PLOTS:
        raise ValueError(f"plot: must be one of {', '.join(KINDS)}, got {kind!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    key = (source.study_id, kind, fmt)
    content = _cached(source, key, data_dir)
    if content is not None:
        return Plot(content, rendered=False)
    with _stripes[hash(key) % _STRIPES]:
        content = _cached(source, key, data_dir)  # drawn while this request waited
        if content is not None:
            return Plot(content, rendered=False)
        started = time.perf_counter()
        spec = StudySpec.from_stored(source.spec)
        trials = load_trials(storage_url, source.study_id, spec)
        content = plots.render(kind, spec, trials, fmt)
        _store(source, key, content, data_dir)
    logger.info(
        "plot %s.%s of study %s drawn in %.2f s (%d trials)",
        kind, fmt, source.study_id, time.perf_counter() - started, len(trials),
    )  # fmt: skip
    return Plot(content, rendered=True)
