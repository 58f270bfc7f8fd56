"""`service.processes`: finding processes by command line among a process's descendants."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

from service.processes import command_line, descendants, outermost
from tests.service.helpers import wait_for

# A parent that forks and does not exec: for as long as both sleep, the child carries the
# parent's command line, as a worker that a raylet is starting does until its exec.
FORK_AND_SLEEP = "import os, time; os.fork(); time.sleep(60)"


def test_a_forked_child_with_its_parents_command_line_is_not_taken_for_it() -> None:
    parent = subprocess.Popen([sys.executable, "-c", FORK_AND_SLEEP])
    try:
        children = wait_for(lambda: descendants(parent.pid), 30, "the fork")
        assert command_line(children[0]) == command_line(parent.pid)  # the same, until exec
        matches = [p for p in [parent.pid, *children] if "os.fork()" in command_line(p)]
        assert len(matches) == 2

        assert outermost(matches) == [parent.pid]
        assert outermost(list(reversed(matches))) == [parent.pid]
        assert outermost(children) == children  # alone, the child is outermost
    finally:
        for pid in descendants(parent.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
