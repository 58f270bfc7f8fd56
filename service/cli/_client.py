"""`ratebench submit|status|cancel|leaderboard`: the API's client over HTTP.

The API is RATEBENCH_URL (default http://127.0.0.1:8000) and the key RATEBENCH_API_KEY, or
`--url` / `--key`. Problems the API reports (401, 404, 422 with field paths) are printed as one
line each, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from service.cli._common import CliError, SubParsers

FINISHED = {"completed", "completed_with_errors", "failed", "cancelled"}
_STYLE = {"completed": "green", "completed_with_errors": "yellow", "failed": "red"}


def register(subparsers: SubParsers) -> None:
    submit = subparsers.add_parser("submit", help="submit a study spec (JSON file) to the API")
    submit.add_argument("spec", type=Path, help="study spec, e.g. examples/quick.json")
    submit.add_argument("--idempotency-key", help="retrying with the same key never duplicates")
    submit.add_argument("--wait", action="store_true", help="follow the study until it ends")
    _add_connection(submit)
    submit.set_defaults(handler=_submit)

    status = subparsers.add_parser("status", help="show a study's status and per-arm progress")
    status.add_argument("id")
    status.add_argument("--follow", action="store_true", help="refresh until the study ends")
    _add_connection(status)
    status.set_defaults(handler=_status)

    cancel = subparsers.add_parser("cancel", help="cancel a queued or running study")
    cancel.add_argument("id")
    _add_connection(cancel)
    cancel.set_defaults(handler=_cancel)

    board = subparsers.add_parser("leaderboard", help="a study's or a task's leaderboard")
    which = board.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", help="study id")
    which.add_argument("--task", help="task name (across all finished studies)")
    board.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_connection(board)
    board.set_defaults(handler=_leaderboard)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="API base URL (default RATEBENCH_URL or 127.0.0.1:8000)")
    parser.add_argument("--key", help="API key (default RATEBENCH_API_KEY)")


def _request(args: argparse.Namespace, method: str, path: str, **kwargs: Any) -> Any:
    import httpx

    from service.config import get_settings

    settings = get_settings()
    base = (args.url or settings.url).rstrip("/")
    key = args.key or settings.api_key
    headers = dict(kwargs.pop("headers", {}))
    if key:
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.request(
            method, f"{base}/api/v1{path}", headers=headers, timeout=30, **kwargs
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the API at {base}: {exc}") from None
    if response.status_code >= 400:
        raise CliError(_describe_error(response.status_code, response.text))
    return response.json()


def _describe_error(code: int, text: str) -> str:
    try:
        detail = json.loads(text).get("detail", text)
    except (ValueError, AttributeError):
        detail = text
    if isinstance(detail, list):  # FastAPI validation errors: one line per field
        lines = []
        for item in detail:
            loc = ".".join(str(p) for p in item.get("loc", []) if p != "body")
            lines.append(f"{loc or 'body'}: {item.get('msg', item)}")
        detail = "\n  ".join(lines)
    return f"HTTP {code}: {detail}"


def _submit(args: argparse.Namespace) -> int:
    try:
        spec = json.loads(args.spec.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {args.spec}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{args.spec} is not valid JSON: {exc}") from None
    headers = {"Idempotency-Key": args.idempotency_key} if args.idempotency_key else {}
    answer = _request(args, "POST", "/studies", json=spec, headers=headers)
    print(answer["id"])
    for warning in answer.get("warnings") or []:
        print(f"warning: {warning}", file=sys.stderr)
    if args.wait:
        return _follow(args, answer["id"])
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.follow:
        return _follow(args, args.id)
    study = _request(args, "GET", f"/studies/{args.id}")
    _print_status(study)
    return 0


def _cancel(args: argparse.Namespace) -> int:
    study = _request(args, "POST", f"/studies/{args.id}/cancel")
    print(
        f"{study['id']} {study['status']}" + (" (stopping)" if study["status"] == "running" else "")
    )
    return 0


def _print_status(study: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    style = _STYLE.get(study["status"], "bold")
    console.print(
        f"[bold]{study['name']}[/] {study['id']}  task={study['task']}  "
        f"status=[bold {style}]{study['status']}[/]"
    )
    if study.get("error"):
        console.print(f"[red]error:[/] {study['error']}")
    arms = (study.get("progress") or {}).get("arms", {})
    if arms:
        table = Table(
            "arm", "status", "done", "pruned", "diverged", "failed", "running", "budget", "best"
        )
        for label, arm in arms.items():
            table.add_row(
                label,
                arm.get("status", "—"),
                *(
                    str(arm.get(k, 0))
                    for k in ("complete", "pruned", "diverged", "failed", "running", "budget")
                ),
                _fmt(arm.get("best_value")),
            )
        console.print(table)
        for label, arm in arms.items():
            if arm.get("status") == "failed":
                console.print(f"[red]arm {label} failed:[/] {arm.get('error') or '—'}")
    for warning in study.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {warning}")


def _follow(args: argparse.Namespace, study_id: str) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task(study_id, total=None)
        while True:
            study = _request(args, "GET", f"/studies/{study_id}")
            done, total = _counts(study.get("progress") or {})
            bar.update(
                task,
                completed=done,
                total=total or None,
                description=f"{study['name']} [{study['status']}]",
            )
            if study["status"] in FINISHED:
                break
            time.sleep(1.0)
    _print_status(study)
    return 0 if study["status"] == "completed" else 1


def _counts(progress: dict[str, Any]) -> tuple[int, int]:
    """Trials finished and planned: every arm's sweep and final seeds (a retry counts once)."""
    return int(progress.get("trials_done", 0)), int(progress.get("trials_total", 0))


def _fmt(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def _leaderboard(args: argparse.Namespace) -> int:
    from rich.console import Console

    if args.study:
        board = _request(args, "GET", f"/studies/{args.study}/leaderboard")
    else:
        board = _request(args, "GET", "/leaderboard", params={"task": args.task})
    if args.json:
        print(json.dumps(board, indent=2))
        return 0
    console = Console()
    if not console.is_terminal:  # a pipe or file gets the whole table, not 80 columns
        console = Console(width=160)
    console.print(_study_table(board) if args.study else _task_table(board))
    return 0


def _interval(row: dict[str, Any]) -> str:
    low, high = row.get("interval_low"), row.get("interval_high")
    return "—" if low is None or high is None else f"[{low:.4g}, {high:.4g}]"


def _study_table(board: dict[str, Any]) -> Any:
    """A study's arms with their intervals and what the seeds can and cannot tell apart."""
    from rich.table import Table

    table = Table(
        "#", "arm", "scheme", "best lr", "mean", "interval", "seeds", "trials", "diverged",
        "ties", "too few seeds to tell",
    )  # fmt: skip
    for row in board["arms"]:
        failed = (row.get("summary") or {}).get("status") == "failed"
        table.add_row(
            str(row["rank"]),
            f"{row['arm']} [red](failed)[/]" if failed else row["arm"],
            row["scheme"],
            _fmt(row["best_lr"]),
            _fmt(row["objective_mean"]),
            _interval(row),
            str(row.get("n_seeds", "—")),
            str(row["n_trials"]),
            str(row["n_diverged"]),
            ", ".join(row.get("ties") or []),
            ", ".join(row.get("too_few_seeds_to_tell") or []),
        )
    arms = board["arms"]
    level = round(100 * arms[0].get("confidence", 0.95)) if arms else 95
    table.caption = (
        f"mean over final seeds, {level}% Student-t interval clipped to the metric's range; "
        "ties: Welch's test cannot separate the arms; too few seeds to tell: it cannot because "
        "an arm has too few seeds, no evidence either way"
    )
    return table


def _task_table(board: dict[str, Any]) -> Any:
    from rich.table import Table

    table = Table(
        "arm", "scheme", "best lr", "mean of studies", "best study", "studies", "trials",
        "diverged",
    )  # fmt: skip
    for row in board["arms"]:
        table.add_row(
            row["arm"],
            row["scheme"],
            _fmt(row["best_lr"]),
            _fmt(row["objective_mean"]),
            _fmt(row["objective_best"]),
            str(row["studies"]),
            str(row["n_trials"]),
            str(row["n_diverged"]),
        )
    table.caption = f"{board['task']}: {board['metric']} ({board['direction']})"
    return table
