"""`ratebench tasks|schemes|validate`: what a spec may contain, and whether one would be
accepted, before it is submitted.

`tasks` and `schemes` ask the API (`GET /tasks`, `GET /schemes`), so they show what the service
at `--url` can run. `validate` checks a spec file right here, with the checks `POST /studies`
runs before it stores anything (`spec_problems`): the spec's fields, the data folder against
the data roots, and the compute budget, from this machine's settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.cli._common import CliError, SubParsers, add_connection, api_json, console

if TYPE_CHECKING:
    from service.config import Settings


def register(subparsers: SubParsers) -> None:
    tasks = subparsers.add_parser(
        "tasks",
        help="list the tasks (dataset × model, built-in or a plugin's) a spec may name",
        description="Each task with its package and version, loss, inputs and outputs, and its "
        "model's options (type, default, range); --json prints them in full.",
    )
    tasks.add_argument("--json", action="store_true", help="print the API's JSON")
    add_connection(tasks)
    tasks.set_defaults(handler=_tasks)

    schemes = subparsers.add_parser(
        "schemes", help="list the learning-rate schemes and their hyperparameters"
    )
    schemes.add_argument("--json", action="store_true", help="print the API's JSON")
    add_connection(schemes)
    schemes.set_defaults(handler=_schemes)

    validate = subparsers.add_parser(
        "validate",
        help="check a spec file as `submit` would, without submitting it",
        description="Prints 'ok', or one line per problem with its field path (exit code 2).",
    )
    validate.add_argument("spec", type=Path, help="study spec, e.g. examples/quick.json")
    validate.set_defaults(handler=_validate)


def _tasks(args: argparse.Namespace) -> int:
    from rich.table import Table

    tasks = api_json(args, "GET", "/tasks")
    if args.json:
        print(json.dumps(tasks, indent=2))
        return 0
    table = Table("task", "package", "loss", "input → outputs", "model options", "description")
    for t in tasks:
        shape = "×".join(str(n) for n in t.get("input_shape") or []) or "from the data"
        outputs = t.get("n_outputs") or "?"
        options = "\n".join(_option(o) for o in t.get("options") or []) or "-"
        table.add_row(t["name"], f"{t.get('package')} {t.get('version')}", t.get("loss", "-"),
                      f"{shape} → {outputs}", options, t.get("description", ""))  # fmt: skip
    console().print(table)
    return 0


def _option(o: dict[str, Any]) -> str:
    """`width=128 [1, 4096]`, `activation='relu' (relu|tanh)`."""
    text = f"{o['name']}={o['default']!r}"
    if o.get("choices"):
        return f"{text} ({'|'.join(o['choices'])})"
    return f"{text} {_range(o)}" if o["type"] in ("int", "float") else text


def _range(h: dict[str, Any]) -> str:
    low, high = h.get("low"), h.get("high")
    if low is None and high is None:
        return "-"
    return f"[{'-∞' if low is None else f'{low:g}'}, {'∞' if high is None else f'{high:g}'}]"


def _schemes(args: argparse.Namespace) -> int:
    from rich.table import Table

    schemes = api_json(args, "GET", "/schemes")
    if args.json:
        print(json.dumps(schemes, indent=2))
        return 0
    table = Table("scheme", "layer-wise", "hyperparameters (default, range)", "summary")
    for s in schemes:
        knobs = "\n".join(
            f"{h['name']}={h['default']!r} {_range(h)}" + (" log" if h.get("log") else "")
            for h in s.get("hyperparameters") or []
        )
        table.add_row(s["name"], "yes" if s.get("layerwise") else "no", knobs, s.get("summary", ""))
    console().print(table)
    return 0


def spec_problems(data: Any, settings: Settings) -> tuple[list[str], list[str]]:
    """What `POST /studies` would refuse in `data` (one `field.path: problem` line each) and
    what it would warn about, without a database: the spec's own validation, then what the
    service refuses of a valid spec (`service.admission`: the task's data folder against the
    allowed data roots, the compute budget, a step's memory and FLOPs)."""
    from pydantic import ValidationError

    from service.admission import admission_problems
    from worker.report.stats import seed_warning
    from worker.spec import StudySpec, format_errors
    from worker.tasks import DataRoots

    try:
        with DataRoots.using(settings.allowed_data_roots()):  # what its checks read, as a service
            spec = StudySpec.model_validate(data)
    except ValidationError as exc:
        return format_errors(exc), []
    problems = [
        f"{'.'.join(str(part) for part in loc) or 'spec'}: {message}"
        for loc, message, _ in admission_problems(spec, settings, redact=False)
    ]
    warning = seed_warning(spec.budget.final_seeds)
    return problems, [warning] if warning else []


def _validate(args: argparse.Namespace) -> int:
    from service.config import get_settings

    try:
        data = json.loads(args.spec.read_text())
    except OSError as exc:
        raise CliError(f"cannot read {args.spec}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise CliError(f"{args.spec}: not valid JSON: {exc.msg} at line {exc.lineno}") from None
    problems, warnings = spec_problems(data, get_settings())
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if problems:
        for line in problems:
            print(line)
        return 2
    print("ok")
    return 0
