"""`ratebench export ID` and `ratebench import FILE`: move a finished study, with every trial,
from one ratebench database to another (`service.export`'s JSON bundle).

`export` asks the API (`GET /studies/ID/export`); `import` writes into a database directly
(`--database-url`, default the configured one, migrated first, as `keys` does), keeping the
study's id: a database that already has that id is left alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.cli._common import (
    CliError,
    SubParsers,
    add_connection,
    add_database_option,
    api_response,
    database_url,
)


def register(subparsers: SubParsers) -> None:
    export = subparsers.add_parser(
        "export", help="write a study, with every trial, as one JSON bundle (from the API)"
    )
    export.add_argument("id", help="study id")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    add_connection(export)
    export.set_defaults(handler=_export)

    load = subparsers.add_parser(
        "import",
        help="load a study bundle (from `export`) into a database",
        description="Creates the study with the same id, its leaderboard rows and its Optuna "
        "studies and trials; refuses when the database already has that study.",
    )
    load.add_argument("file", type=Path, help="bundle written by `ratebench export`")
    add_database_option(load)
    load.set_defaults(handler=_import)


def _export(args: argparse.Namespace) -> int:
    text = api_response(args, "GET", f"/studies/{args.id}/export").text
    if args.out is None:
        sys.stdout.write(text + "\n")
        return 0
    try:
        args.out.write_text(text)
    except OSError as exc:
        raise CliError(f"cannot write {args.out}: {exc.strerror}") from None
    print(args.out)
    return 0


def _import(args: argparse.Namespace) -> int:
    import sqlalchemy as sa

    from service.db import get_engine, migrate
    from service.export import BundleError, import_bundle, load_bundle

    try:
        text = args.file.read_text()
    except OSError as exc:
        raise CliError(f"cannot read {args.file}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CliError(f"{args.file}: not a ratebench export (not text)") from None
    try:
        bundle = load_bundle(text)
    except BundleError as exc:
        raise CliError(f"{args.file}: {exc}") from None
    url = database_url(args)
    try:
        migrate(url)
        import_bundle(get_engine(url), url, bundle)
    except BundleError as exc:
        raise CliError(str(exc)) from None
    except sa.exc.OperationalError as exc:
        raise CliError(f"cannot use the database: {str(exc.orig).strip()}") from None
    study = bundle.study
    trials = sum(len(s.trials) for s in bundle.optuna_studies)
    print(f"imported study {study.id} ({study.name}): {len(bundle.arm_results)} arms, "
          f"{trials} trials")  # fmt: skip
    return 0
