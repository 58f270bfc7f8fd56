"""Where a command's CPU goes, by kind of process: run it (the test suite, say) and sample every
process of the machine once a second.

    python bench/suite_cpu.py --out cpu.json -- .venv/bin/python -m pytest -n 2 --dist worksteal

The test suite starts hundreds of processes that `time` never counts: Ray's daemons and worker
processes are not the suite's children, and a killed service's trials die with it. This reads
`/proc` instead. It prints the machine's busy CPU seconds (all cores, every process, from
`/proc/stat`) against the wall time the cores offered, then the CPU seconds of each kind of
process with how many there were. What a process used after the last look before it ended
is missed (all of it, for one that lived less than a second); the machine's busy total counts
it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from service.processes import command_line, cpu_seconds

# The first pattern that matches a command line names its kind. A Ray worker's title changes
# with its task, so every worker counts as one kind.
KINDS = [
    (r"default_worker\.py|setup_worker\.py|ray::(IDLE|ratebench|Mailbox|_|run)", "Ray worker"),
    (r"raylet|gcs_server|dashboard|log_monitor|monitor\.py|RuntimeEnvAgent|ray::", "Ray daemon"),
    (r"service\.cli serve|ratebench serve", "ratebench serve"),
    (r"service\.cli|bin/ratebench|chaos\.py|schemathesis", "other ratebench or tool process"),
    (r"pytest|sys\.stdin\.readline", "pytest process"),
    (r"postgres|initdb|pg_ctl", "PostgreSQL"),
    (r"chrom", "Chromium"),
    (r"mypy|ruff", "lint and types"),
]


def kind_of(command: str) -> str:
    for pattern, kind in KINDS:
        if re.search(pattern, command):
            return kind
    return "other" if command.strip() else "gone before its command line was read"


def _busy_seconds() -> float:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def _look(seen: dict[int, tuple[float, str]]) -> None:
    """Each process's CPU seconds so far, with the first command line read for it."""
    for pid, cpu in cpu_seconds().items():
        _, command = seen.get(pid, (0.0, ""))
        seen[pid] = (cpu, command or command_line(pid))


def profile(command: list[str]) -> dict[str, Any]:
    seen: dict[int, tuple[float, str]] = {}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            _look(seen)

    _look(seen)
    before = dict(seen)
    busy_before, began = _busy_seconds(), time.monotonic()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = subprocess.call(command)
    stop.set()
    sampler.join()
    _look(seen)
    wall, busy = time.monotonic() - began, _busy_seconds() - busy_before
    seconds: dict[str, float] = defaultdict(float)
    count: Counter[str] = Counter()
    for pid, (cpu, cmd) in seen.items():
        used = cpu - before.get(pid, (0.0, ""))[0]
        if used > 0:
            kind = kind_of(cmd)
            seconds[kind] += used
            count[kind] += 1
    return {
        "command": command,
        "exit_code": code,
        "wall_s": round(wall, 1),
        "cores": os.cpu_count(),
        "busy_cpu_s": round(busy, 1),
        "busy_share": round(busy / (wall * (os.cpu_count() or 1)), 3),
        "by_kind": {
            kind: {"cpu_s": round(s, 1), "processes": count[kind]}
            for kind, s in sorted(seconds.items(), key=lambda item: -item[1])
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: what to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    result = profile(command)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return int(result["exit_code"])


if __name__ == "__main__":
    sys.exit(main())
