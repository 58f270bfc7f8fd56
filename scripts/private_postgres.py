"""A PostgreSQL server of one's own, in a temporary folder on a free loopback port, that can be
crashed and restarted without touching anybody else's: the database outage test
(tests/service/test_outage.py) and the chaos soak (scripts/chaos.py) restart it.

Needs Debian's PostgreSQL binaries (`initdb`, `pg_ctl`); as root, runs them as the `postgres`
user through `runuser`, since initdb refuses root.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PrivatePostgres", "unavailable_reason"]


def _tool(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name) or ""


def unavailable_reason() -> str | None:
    """Why no private server can be made here, or None when one can."""
    if not _tool("initdb") or not _tool("pg_ctl"):
        return "initdb/pg_ctl not found (Debian: apt-get install postgresql)"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root and runuser is missing: initdb refuses root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class PrivatePostgres:
    """A PostgreSQL cluster in `data`, listening on 127.0.0.1:`port` only (trust auth, user
    postgres). `create()` makes and starts one; `remove()` stops it and deletes its folder."""

    data: Path
    port: int
    as_user: list[str]

    @classmethod
    def create(cls) -> PrivatePostgres:
        reason = unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        as_user: list[str] = []
        folder = Path(tempfile.mkdtemp(prefix="ratebench-pg-"))  # not under root's 0700 dirs
        if os.geteuid() == 0:
            shutil.chown(folder, "postgres", "postgres")
            as_user = ["runuser", "-u", "postgres", "--"]
        server = cls(folder, _free_port(), as_user)
        try:
            subprocess.run([*as_user, _tool("initdb"), "-D", str(folder), "-U", "postgres",
                            "--auth=trust", "-E", "UTF8"], check=True, capture_output=True,
                           timeout=120)  # fmt: skip
            server.start()
        except BaseException:
            server.remove()
            raise
        return server

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _pg_ctl(self, *args: str, check: bool = True) -> None:
        subprocess.run([*self.as_user, _tool("pg_ctl"), "-D", str(self.data), *args],
                       check=check, capture_output=True, timeout=60)  # fmt: skip

    def start(self) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        self._pg_ctl("-o", options, "-l", str(self.data / "server.log"), "-w", "start")

    def crash(self) -> None:
        """Stop at once, as a crash does (`-m immediate`: no checkpoint, clients cut off)."""
        self._pg_ctl("-m", "immediate", "-w", "stop")

    def remove(self) -> None:
        self._pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(self.data, ignore_errors=True)
