"""This machine's processes as Linux's /proc tells them: what a process runs, its children,
its session. `ratebench cluster` finds the processes of its nodes with it, the chaos soak
(scripts/chaos.py) the Ray processes under a service, and the tests what they kill.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "alive",
    "command_line",
    "cpu_seconds",
    "descendants",
    "in_session",
    "naming",
    "outermost",
]


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name: state, ppid, pgrp, session, …"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:  # it ended
        return None


def _pids() -> list[int]:
    return [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def cpu_seconds() -> dict[int, float]:
    """Every process's CPU time so far (user + system, in seconds), by pid (what the benchmarks
    count for processes `time` never waits for: Ray's daemons and workers)."""
    hz = os.sysconf("SC_CLK_TCK")
    found: dict[int, float] = {}
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None:
            found[pid] = (int(fields[11]) + int(fields[12])) / hz
    return found


def command_line(pid: int) -> str:
    """The process's command line, its arguments joined by spaces ("" once it ended)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode("utf-8", "replace")


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has ended)."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def descendants(pid: int) -> list[int]:
    """Every process below `pid`: its children, theirs, and so on."""
    children: dict[int, list[int]] = {}
    for child in _pids():
        fields = _stat(child)
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def outermost(pids: list[int]) -> list[int]:
    """Those of `pids` that no other of them is an ancestor of. A process forked by another
    carries its parent's command line until it calls exec, so a match by command line can name
    a parent and, for that moment, its child too: a raylet starting a worker process (seen on
    a loaded machine, where the exec is slow)."""
    chosen = set(pids)

    def below_another(pid: int) -> bool:
        fields = _stat(pid)
        while fields is not None and int(fields[1]) > 1:
            parent = int(fields[1])
            if parent in chosen:
                return True
            fields = _stat(parent)
        return False

    return [pid for pid in pids if not below_another(pid)]


def in_session(session: int) -> list[int]:
    """The processes whose session is `session` (its leader's pid)."""
    found = []
    for pid in _pids():
        fields = _stat(pid)
        if fields is not None and int(fields[3]) == session:
            found.append(pid)
    return found


def naming(text: str) -> list[int]:
    """The processes whose command line contains `text` (a folder of theirs, say)."""
    return [pid for pid in _pids() if text in command_line(pid)]
