"""`bench/suite_cpu.py` counts the CPU of processes the command did not wait for."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest


def _suite_cpu() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "bench" / "suite_cpu.py"
    spec = importlib.util.spec_from_file_location("suite_cpu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # it burns a second of CPU on purpose
def test_a_detached_grandchild_is_counted_under_its_kind() -> None:
    """A `ratebench serve` look-alike started in its own session and not waited for (as Ray's
    daemons are) still has its CPU counted."""
    suite_cpu = _suite_cpu()
    # It burns a second of CPU, then lives on for looks to see all of it: what a process uses
    # after the last look before it ends is not counted.
    burn = (
        "import time; t = time.process_time()\n"
        "while time.process_time() - t < 1.0: pass\n"
        "time.sleep(3)"
    )
    script = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], "
        "'service.cli serve'], start_new_session=True).wait()"
    )
    result = suite_cpu.profile([sys.executable, "-c", script, burn])
    assert result["exit_code"] == 0
    assert result["by_kind"]["ratebench serve"]["cpu_s"] >= 0.9
    assert result["busy_cpu_s"] >= result["by_kind"]["ratebench serve"]["cpu_s"] - 0.1


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("/v/bin/python /v/ray/_private/workers/default_worker.py --node-ip-address=127.0.0.1",
         "Ray worker"),
        ("ray::ratebench trial sgd/sweep/3", "Ray worker"),
        ("/v/ray/core/src/ray/raylet/raylet --raylet_socket_name=/tmp/ray/s", "Ray daemon"),
        ("/v/bin/python -m service.cli serve --port 4000", "ratebench serve"),
        ("/v/bin/python -m service.cli submit spec.json", "other ratebench or tool process"),
        ("postgres: 14/main: checkpointer", "PostgreSQL"),
        ("", "gone before its command line was read"),
    ],
)  # fmt: skip
def test_command_lines_are_sorted_into_kinds(command: str, kind: str) -> None:
    assert _suite_cpu().kind_of(command) == kind
