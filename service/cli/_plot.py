"""`ratebench plot STUDY_ID`: write a study's plots (sensitivity, curves, factors) to files.

Reads the database directly (like `keys`), so it works with or without a running API; with
`--url` it asks a service for them instead (`GET /studies/ID/plots/KIND.FORMAT`), so it also
works against a remote service whose database this machine cannot open.

Files are `<slug>-<kind>.<format>` in `--out`: the slug is the study's name with every
character other than letters, digits, spaces and `_.+=-` replaced by `-`, without leading or
trailing dots, dashes and spaces (`study` when nothing is left). A name is any text its
submitter chose (`../../x`, `/etc/x`), so it never becomes a path of its own.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from service.cli._common import (
    CliError,
    SubParsers,
    add_database_option,
    api_json,
    api_response,
    database_url,
    open_database,
)

KINDS = ("sensitivity", "curves", "factors")


def plot_file(out: Path, name: str, kind: str, fmt: str) -> Path:
    """Where a study's plot goes: always directly in `out` (see the module docstring)."""
    slug = re.sub(r"[^A-Za-z0-9 _.+=-]+", "-", name).strip(" .-")[:80].strip(" .-") or "study"
    return out / f"{slug}-{kind}.{fmt}"


def register(subparsers: SubParsers) -> None:
    parser = subparsers.add_parser("plot", help="write a study's plots to PNG or SVG files")
    parser.add_argument("study", help="study id")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory (default: .)")
    parser.add_argument("--format", choices=["png", "svg"], default="png", help="file format")
    parser.add_argument(
        "--kind", action="append", choices=list(KINDS),
        help="plot to write (repeatable; default: all)",
    )  # fmt: skip
    add_database_option(parser)
    parser.add_argument(
        "--url", nargs="?", const="",
        help="ask the API for the plots instead of opening the database: at this base URL, "
        "or at RATEBENCH_URL when given without one",
    )  # fmt: skip
    parser.add_argument("--key", help="API key with --url (default RATEBENCH_API_KEY)")
    parser.set_defaults(handler=_plot)


def _plot(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _plot_remote(args)
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
        path = plot_file(args.out, study.name, kind, args.format)
        path.write_bytes(plots.render(kind, spec, trials, args.format))
        print(path)
    return 0


def _plot_remote(args: argparse.Namespace) -> int:
    args.url = args.url or None  # `--url` alone: the configured URL
    name = api_json(args, "GET", f"/studies/{args.study}")["name"]
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.kind or list(KINDS):
        content = api_response(
            args, "GET", f"/studies/{args.study}/plots/{kind}.{args.format}"
        ).content
        path = plot_file(args.out, name, kind, args.format)
        path.write_bytes(content)
        print(path)
    return 0
