"""Study plots for the API and the web page, cached on disk once a study has finished.

A finished study's trials never change, so its plots are rendered once into
`<data_dir>/plots/<study id>/<kind>.<fmt>`; a running study's are rendered on each request.
"""

from __future__ import annotations

from pathlib import Path

from service.models import StudyRecord, StudyStatus
from worker.report import plots
from worker.results import load_trials
from worker.spec import StudySpec

__all__ = ["FORMATS", "KINDS", "study_plot"]

KINDS = tuple(plots.PLOTS)
FORMATS = plots.FORMATS


def study_plot(study: StudyRecord, kind: str, fmt: str, storage_url: str, data_dir: Path) -> bytes:
    """The plot `kind` of `study` as `fmt` bytes (ValueError for an unknown kind or format)."""
    if kind not in plots.PLOTS:
        raise ValueError(f"plot: must be one of {', '.join(KINDS)}, got {kind!r}")
    if fmt not in FORMATS:
        raise ValueError(f"format: must be one of {', '.join(FORMATS)}, got {fmt!r}")
    finished = StudyStatus(study.status).finished
    cached = data_dir / "plots" / study.id / f"{kind}.{fmt}"
    if finished and cached.is_file():
        return cached.read_bytes()
    spec = StudySpec.model_validate(study.spec)
    content = plots.render(kind, spec, load_trials(storage_url, study.id, spec), fmt)
    if finished:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.write_bytes(content)
    return content
