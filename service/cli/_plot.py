"""`ratebench plot STUDY_ID`: write a study's plots (sensitivity, curves, factors) to files.

Reads the database directly (like `keys`), so it works with or without a running API.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli._common import (
    CliError,
    SubParsers,
    add_database_option,
    database_url,
    open_database,
)


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("plot", help="write a study's plots to PNG or SVG files")
    parser.add_argument("study", help="study id")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory (default: .)")
    parser.add_argument("--format", choices=["png", "svg"], default="png")
    parser.add_argument(
        "--kind", action="append", choices=["sensitivity", "curves", "factors"],
        help="plot to write (repeatable; default: all)",
    )  # fmt: skip
    add_database_option(parser)
    parser.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    from service.models import StudyRecord
    from worker.report import plots
    from worker.results import load_trials
    from worker.spec import StudySpec

    with open_database(args) as session:
        study = session.get(StudyRecord, args.study)
        if study is None:
            raise CliError(f"no study {args.study!r} in {database_url(args)}")
        spec = StudySpec.from_stored(study.spec)
    trials = load_trials(database_url(args), study.id, spec)
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kind or list(plots.PLOTS):
        path = args.out / f"{study.name}-{kind}.{args.format}"
        path.write_bytes(plots.render(kind, spec, trials, args.format))
        print(path)
    return 0
