"""`ratebench submit|status|cancel|list|trials|leaderboard`: the API's client over HTTP.

The API is RATEBENCH_URL (default http://127.0.0.1 at RATEBENCH_PORT, else 8000) and the key
RATEBENCH_API_KEY, or `--url` / `--key`. Problems the API reports (401, 404, 422 with field
paths) are printed as one line each, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli._common import (
    CliError,
    SubParsers,
    add_connection,
    api_json,
    api_response,
    console,
    safe,
)
from service.cli._tables import arm_table

FINISHED = {"completed", "completed_with_errors", "failed", "cancelled"}
_STYLE = {"completed": "green", "completed_with_errors": "yellow", "failed": "red"}


def register(subparsers: SubParsers) -> None:
    submit = subparsers.add_parser("submit", help="submit a study spec (JSON file) to the API")
    submit.add_argument("spec", type=Path, help="study spec, e.g. examples/quick.json")
    submit.add_argument("--idempotency-key", help="retrying with the same key never duplicates")
    submit.add_argument("--wait", action="store_true", help="follow the study until it ends")
    submit.add_argument(
        "--wait-for-api",
        type=float,
        default=180.0,
        metavar="SECONDS",
        help="keep trying this long while the API is not listening yet (default 180)",
    )
    submit.add_argument(
        "--public", action="store_true",
        help="readable by every key where studies are private (RATEBENCH_PRIVATE_STUDIES)",
    )  # fmt: skip
    add_connection(submit)
    submit.set_defaults(handler=_submit)

    visibility = subparsers.add_parser(
        "visibility", help="make one of your studies public or private again"
    )
    visibility.add_argument("id", help="study id")
    visibility.add_argument(
        "state", choices=["public", "private"],
        help="public: every key may read it where studies are private",
    )  # fmt: skip
    add_connection(visibility)
    visibility.set_defaults(handler=_visibility)

    status = subparsers.add_parser("status", help="show a study's status and per-arm progress")
    status.add_argument("id", help="study id (as `submit` printed it)")
    status.add_argument("--follow", action="store_true", help="refresh until the study ends")
    add_connection(status)
    status.set_defaults(handler=_status)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running study")
    cancel.add_argument("id", help="study id")
    add_connection(cancel)
    cancel.set_defaults(handler=_cancel)

    listing = subparsers.add_parser("list", help="list studies, newest first")
    listing.add_argument(
        "--status",
        choices=["queued", "running", "completed", "completed_with_errors", "failed", "cancelled"],
        help="only studies in this state",
    )
    listing.add_argument("--task", help="only studies of this task, e.g. mnist1d-mlp")
    listing.add_argument(
        "--limit", type=int, default=50, help="at most this many (1 to 200; default 50)"
    )
    listing.add_argument("--offset", type=int, default=0, help="skip this many (default 0)")
    listing.add_argument("--json", action="store_true", help="print the API's JSON page")
    add_connection(listing)
    listing.set_defaults(handler=_list)

    trials = subparsers.add_parser(
        "trials", help="a study's trials: a table, or CSV with per-epoch history"
    )
    trials.add_argument("id", help="study id")
    trials.add_argument("--arm", help="only this arm's trials (its label)")
    trials.add_argument(
        "--csv", action="store_true", help="print CSV (GET /studies/ID/trials.csv) for a file"
    )
    trials.add_argument(
        "--form",
        choices=["wide", "long"],
        default="wide",
        help="CSV shape: wide (a row per trial, history as epoch_<n>_<metric> columns; "
        "default) or long (a row per trial × epoch × metric)",
    )
    add_connection(trials)
    trials.set_defaults(handler=_trials)

    board = subparsers.add_parser("leaderboard", help="a study's or a task's leaderboard")
    which = board.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="study id")
    which.add_argument("--task", help="task name (across all finished studies)")
    board.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_board_filters(board)
    add_connection(board)
    board.set_defaults(handler=_leaderboard)


def _add_board_filters(board: argparse.ArgumentParser) -> None:
    """`GET /leaderboard`'s parameters besides `task`, under the API's names (`service.
    comparability`): each narrows a task's board to one setting's rows."""
    filters = board.add_argument_group(
        "task board filters (with --task; the API's query parameters of the same names)"
    )
    filters.add_argument("--metric", help="objective metric (default: the most used)")
    filters.add_argument("--setting", help="a group's or an arm setting's id")
    filters.add_argument("--epochs", type=_positive, help="the budget's epochs, e.g. 15")
    filters.add_argument(
        "--steps-per-epoch", dest="steps_per_epoch", type=_positive,
        help="the budget's steps per epoch",
    )  # fmt: skip
    filters.add_argument(
        "--filter", action="append", default=[], metavar="NAME=VALUE", dest="filters",
        help="any other setting filter, repeatable: model.<option> (model.width=64), "
        "data.<option> (data.batch_size=128), fixed.<hyperparameter> (fixed.momentum=0.9; "
        "null: arms that do not fix it), schedule.<field> (schedule.name=cosine)",
    )  # fmt: skip


def _positive(text: str) -> int:
    """An integer of at least 1, as the API's `epochs` and `steps_per_epoch` (`ge=1`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _board_params(args: argparse.Namespace) -> dict[str, str]:
    """The task board's query: `task`, `metric` and the setting filters, checked by the API's
    own `parse_filters` (an unknown or repeated name is refused here, naming it, before any
    request)."""
    from service.comparability import FilterError, parse_filters

    pairs = [
        (name, str(value))
        for name in ("setting", "epochs", "steps_per_epoch")
        if (value := getattr(args, name)) is not None
    ]
    for item in args.filters:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise CliError(f"--filter {item!r}: write NAME=VALUE, e.g. model.width=64")
        pairs.append((name.strip(), value))
    try:
        parse_filters(pairs)
    except FilterError as exc:
        raise CliError(f"--filter {exc.name}: {exc}") from None
    params = {"task": args.task, **dict(pairs)}
    return params if args.metric is None else {**params, "metric": args.metric}


def _submit(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(args.spec.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {args.spec}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{args.spec} is not valid JSON: {exc}") from None
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    params = {"public": "true"} if args.public else {}
    answer = api_json(
        args, "POST", "/studies", json=spec, headers=headers, params=params,
        wait_s=args.wait_for_api,
    )  # fmt: skip
    print(answer["id"])
    warnings = list(answer.get("warnings") or [])
    _warn(warnings)
    if args.wait:
        return _follow(args, answer["id"], shown=set(warnings))
    return 0


def _warn(warnings: list[str]) -> None:
    """Each warning once, on a line of its own on stderr: stdout is flushed first, so where
    both streams go to one file or pipe a warning never lands inside a line of stdout."""
    sys.stdout.flush()
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def _status(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(args, args.id)
    study = api_json(args, "GET", f"/studies/{args.id}")
    _print_status(study)
    return 0


def _visibility(args: argparse.Namespace) -> int:
    public = "true" if args.state == "public" else "false"
    study = api_json(args, "POST", f"/studies/{args.id}/visibility", params={"public": public})
    print(f"{study['id']} {'public' if study['public'] else 'private'}")
    return 0


def _cancel(args: argparse.Namespace) -> int:
    study = api_json(args, "POST", f"/studies/{args.id}/cancel")
    print(
        f"{study['id']} {study['status']}" + (" (stopping)" if study["status"] == "running" else "")
    )
    return 0


def _print_status(study: dict[str, Any], shown: set[str] | None = None) -> None:
    """The study's line, its per-arm progress and its warnings, less those in `shown` (what
    `submit` already printed)."""
    from rich.table import Table

    out = console()
    style = _STYLE.get(study["status"], "bold")
    out.print(
        f"[bold]{safe(study['name'])}[/] {safe(study['id'])}  task={safe(study['task'])}  "
        f"status=[bold {style}]{safe(study['status'])}[/]"
    )
    if study.get("error"):
        out.print(f"[red]error:[/] {safe(study['error'])}")
    arms = (study.get("progress") or {}).get("arms", {})
    if arms:
        metric = ((study.get("spec") or {}).get("objective") or {}).get("metric", "objective")
        table = Table(
            "arm", "status", "done", "pruned", "diverged", "failed", "running", "budget",
            f"best sweep {metric}",
            caption=f"best sweep {metric}: the best single sweep trial's value so far; the "
            "ranking uses the final seeds' mean (`ratebench leaderboard --study`)",
        )  # fmt: skip
        for label, arm in arms.items():
            table.add_row(
                safe(label),
                safe(arm.get("status", "—")),
                *(
                    safe(arm.get(k, 0))
                    for k in ("complete", "pruned", "diverged", "failed", "running", "budget")
                ),
                safe(_fmt(arm.get("best_value"))),
            )
        out.print(table)
        for label, arm in arms.items():
            if arm.get("status") == "failed":
                out.print(f"[red]arm {safe(label)} failed:[/] {safe(arm.get('error') or '—')}")
    _warn([w for w in study.get("warnings") or [] if w not in (shown or set())])


def _follow(args: argparse.Namespace, study_id: str, shown: set[str] | None = None) -> int:
    """A progress bar on stderr until the study ends, then its status (`_print_status`)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console(stderr=True),
    ) as bar:
        task = bar.add_task(study_id, total=None)
        while True:
            study = api_json(args, "GET", f"/studies/{study_id}")
            done, total = _counts(study.get("progress") or {})
            bar.update(
                task,
                completed=done,
                total=total or None,
                description=f"{safe(study['name'])} {safe('[' + study['status'] + ']')}",
            )
            if study["status"] in FINISHED:
                break
            time.sleep(1.0)
    _print_status(study, shown)
    return 0 if study["status"] == "completed" else 1


def _counts(progress: dict[str, Any]) -> tuple[int, int]:
    """Trials finished and planned: every arm's sweep and final seeds (a retry counts once)."""
    return int(progress.get("trials_done", 0)), int(progress.get("trials_total", 0))


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _list(args: argparse.Namespace) -> int:
    from rich.table import Table

    params: dict[str, Any] = {"limit": args.limit, "offset": args.offset}
    params.update({k: v for k in ("status", "task") if (v := getattr(args, k)) is not None})
    page = api_json(args, "GET", "/studies", params=params)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    table = Table("id", "name", "task", "status", "trials", "created", "finished")
    for study in page["items"]:
        done, total = _counts(study.get("progress") or {})
        table.add_row(
            safe(study["id"]), safe(study["name"]), safe(study["task"]),
            f"[{_STYLE.get(study['status'], 'bold')}]{safe(study['status'])}[/]",
            f"{done}/{total}" if total else "-",
            safe(_when(study.get("created_at"))), safe(_when(study.get("finished_at"))),
        )  # fmt: skip
    shown = len(page["items"])
    table.caption = f"{shown} of {page['total']} studies (offset {page['offset']})"
    console().print(table)
    return 0


def _when(value: str | None) -> str:
    """An ISO timestamp to the minute, as `2026-01-31 14:05`."""
    return "-" if not value else value[:16].replace("T", " ")


def _trials(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"arm": args.arm} if args.arm else {}
    if args.csv:
        params["form"] = args.form
        text = api_response(args, "GET", f"/studies/{args.id}/trials.csv", params=params).text
        sys.stdout.write(text)
        return 0
    from rich.table import Table

    items: list[dict[str, Any]] = []
    while True:  # every page
        page = api_json(args, "GET", f"/studies/{args.id}/trials",
                        params={**params, "limit": 200, "offset": len(items)})  # fmt: skip
        items.extend(page["items"])
        if not page["items"] or len(items) >= page["total"]:
            break
    table = Table("arm", "role", "#", "outcome", "lr", "objective", "epochs", "seconds", "error")
    for t in items:
        attrs = t.get("user_attrs") or {}
        start, end = t.get("datetime_start"), t.get("datetime_complete")
        cells = (
            t["arm"], t["role"], str(t["number"]), t.get("outcome") or t["state"].lower(),
            _fmt(t["params"].get("lr", attrs.get("lr"))), _fmt(t.get("value")),
            str(len(attrs.get("history") or [])), _seconds(start, end),
            str(attrs.get("error") or "")[:60],
        )  # fmt: skip
        table.add_row(*(safe(cell) for cell in cells))
    table.caption = f"{len(items)} trials; `--csv` for every parameter and epoch"
    console().print(table)
    return 0


def _seconds(start: str | None, end: str | None) -> str:
    from datetime import datetime

    if not start or not end:
        return "-"
    return f"{(datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds():.1f}"


def _leaderboard(args: argparse.Namespace) -> int:
    if args.study:
        given = [f"--{n.replace('_', '-')}" for n in _BOARD_FILTERS if getattr(args, n)]
        if given:
            raise CliError(f"{', '.join(given)}: filters of a task's board (--task), not a study's")
        board = api_json(args, "GET", f"/studies/{args.study}/leaderboard")
    else:
        board = api_json(args, "GET", "/leaderboard", params=_board_params(args))
    if args.json:
        print(json.dumps(board, indent=2))
        return 0
    if args.study:
        spec = api_json(args, "GET", f"/studies/{args.study}")["spec"]
        console().print(arm_table(spec, [_arm_row(row) for row in board["arms"]]))
    else:
        console().print(_task_table(board))
    return 0


_BOARD_FILTERS = ("metric", "setting", "epochs", "steps_per_epoch", "filters")


def _arm_row(row: dict[str, Any]) -> dict[str, Any]:
    """The stored arm summary again: the API's row (rank, interval, ties computed from the
    stored seeds, like `ratebench run` computes them) with its `details` (the summary's other
    fields) merged in."""
    return {**(row.get("details") or {}), **{k: v for k, v in row.items() if k != "details"}}


def _seeds(row: dict[str, Any]) -> str:
    """A board row's distinct seeds, and the re-runs it counted once: `5`, `5 (+10 re-runs)`,
    `5 (+10 re-runs, 2 disagreeing)`."""
    reruns, disagreeing = row.get("n_reruns") or 0, row.get("n_disagreeing") or 0
    if not reruns:
        return str(row["n_seeds"])
    extra = f", {disagreeing} disagreeing" if disagreeing else ""
    return f"{row['n_seeds']} (+{reruns} re-run{'s' if reruns != 1 else ''}{extra})"


def _task_table(board: dict[str, Any]) -> Any:
    """A task's board: one section per setting (rows pool seeds only within one)."""
    from rich.table import Table

    level = next(
        (round(100 * r["confidence"]) for g in board["groups"] for r in g["arms"]
         if r.get("confidence")), 95,
    )  # fmt: skip
    table = Table(
        "#", "arm", "arm setting", "final-seed mean", f"{level}% interval", "seeds", "best lr",
        "studies", "trials", "diverged",
    )  # fmt: skip
    for group in board["groups"]:
        table.add_row(
            f"[bold]setting {safe(group['id'])}[/]", safe(group["description"]), end_section=True
        )
        for row in group["arms"]:
            low, high = row["interval_low"], row["interval_high"]
            cells = (
                str(row["rank"]),
                row["arm"],
                row["setting_description"],
                _fmt(row["objective_mean"]),
                "—" if low is None else f"[{low:.4g}, {high:.4g}]",
                _seeds(row),
                _fmt(row["best_lr"]),
                ", ".join(row["studies"]),
                str(row["n_trials"]),
                str(row["n_diverged"]),
            )
            table.add_row(*(safe(c) for c in cells), end_section=row is group["arms"][-1])
    filters = ", ".join(f"{k}={v}" for k, v in (board.get("filters") or {}).items())
    table.caption = safe(
        f"{board['task']}: {board['metric']} ({board['direction']}); final-seed mean: every "
        "final seed of the setting's studies pooled, with its Student-t interval; seeds are "
        "distinct (configuration, seed) pairs: a re-run of the same configuration on the same "
        "seed counts once; best lr: the best study's"
        + (f"; filtered by {filters}" if filters else "")
    )
    return table
