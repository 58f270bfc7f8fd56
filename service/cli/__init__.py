"""The `ratebench` command: one sub-module per group of sub-commands.

Each sub-module exposes `register(subparsers)`, which adds its sub-commands and sets
`handler` on each parser; `main` dispatches to it. User mistakes are raised as `CliError`
and printed as one line (exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import service.cli._catalog as _catalog
import service.cli._client as _client
import service.cli._cluster as _cluster
import service.cli._export as _export
import service.cli._keys as _keys
import service.cli._plot as _plot
import service.cli._run as _run
import service.cli._scheduler as _scheduler
import service.cli._serve as _serve
from service.cli._common import CliError

__all__ = ["CliError", "main"]

_GROUPS = (_serve, _run, _scheduler, _cluster, _keys, _client, _plot, _export, _catalog)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratebench",
        description="Which learning-rate scheme should I train this network with, and at which "
        "rate? Budget-matched learning-rate sweeps on Optuna and Ray.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for group in _GROUPS:
        group.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ratebench` console script."""
    args = _parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except (CliError, ValueError) as exc:
        if not isinstance(exc, CliError):  # one line too: a Ray setting that cannot connect
            from worker.cluster import ClusterConfigError  # on use: it reads Ray's settings

            if not isinstance(exc, ClusterConfigError):
                raise
        print(f"ratebench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code
