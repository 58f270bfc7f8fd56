"""Which folders a study spec may make the service read, and keeping other paths out of texts
that readers see.

A spec's `data.data_dir` is chosen by whoever holds a key, and the worker reads files there, so
it may only name a folder under the *data roots* the operator configured:
`RATEBENCH_DATA_ROOTS` (folders separated by `os.pathsep`), by default the service's data
folder (`RATEBENCH_DATA_DIR`, `data`) plus `RATEBENCH_CIFAR_DIR` when set. A relative
`data_dir` starts at the first root. Symlinks and `..` are resolved before the check (realpath),
so a link inside a root that points outside is refused too. The refusal reads the same whether
the path exists or not, so a key holder cannot probe the server's file system with it.

The service builds its roots from its settings, the worker from the same environment variables
(`DataRoots.from_env`): the worker checks again just before it reads, so a spec that bypassed
the service (or a root removed since) is still refused. What a spec check reads while the spec
is validated (the headers of a files dataset, `worker.tasks.files`) is read under
`DataRoots.current()`: the roots a service declared for its process (`DataRoots.use`, at start),
else the environment's.

`redact_paths` replaces absolute paths outside the roots with `<path>` in error texts that
anonymous readers may see (a trial's `error`), so those texts do not reveal the server's layout.
`public_paths` goes further for the service's answers to a submit (a refused `data.data_dir`,
missing CIFAR files): no absolute path at all, a path under a root shown relative to it
(`<data root>/cifar-10-batches-py`), so a caller learns neither the roots nor anything else.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DataPathError", "DataRoots", "public_paths", "redact_paths"]

ROOTS_VARIABLE = "RATEBENCH_DATA_ROOTS"


class DataPathError(ValueError):
    """A spec path outside the data roots (or not a path at all); the message names no file."""


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(os.path.expanduser(path)))


@dataclass(frozen=True)
class DataRoots:
    """The folders spec data paths may name (resolved), and the operator's own CIFAR folder,
    read when a spec names none."""

    folders: tuple[Path, ...]
    cifar_dir: Path | None = None

    @classmethod
    def configure(
        cls, roots: str | None, data_dir: str | Path, cifar_dir: str | Path | None = None
    ) -> DataRoots:
        """The roots from the settings: `roots` (os.pathsep-separated) when given and not
        empty, else `data_dir` plus `cifar_dir`."""
        entries = [e for e in (roots or "").split(os.pathsep) if e.strip()]
        if not entries:
            entries = [str(data_dir)] + ([str(cifar_dir)] if cifar_dir else [])
        folders = tuple(dict.fromkeys(_real(e) for e in entries))
        return cls(folders, Path(cifar_dir) if cifar_dir else None)

    @classmethod
    def from_env(cls) -> DataRoots:
        """The roots as the service computes them, read from the same environment variables
        (`RATEBENCH_DATA_ROOTS`, `RATEBENCH_DATA_DIR`, `RATEBENCH_CIFAR_DIR`)."""
        return cls.configure(
            os.environ.get(ROOTS_VARIABLE),
            os.environ.get("RATEBENCH_DATA_DIR") or "data",
            os.environ.get("RATEBENCH_CIFAR_DIR") or None,
        )

    @classmethod
    def use(cls, roots: DataRoots | None) -> None:
        """Declare `roots` as this process's (a service, from its settings); None: the
        environment's again."""
        global _PROCESS_ROOTS
        _PROCESS_ROOTS = roots

    @classmethod
    @contextmanager
    def using(cls, roots: DataRoots) -> Iterator[None]:
        """`roots` as this process's while the block runs (a command validating a spec as a
        service would), then what was there before."""
        before = _PROCESS_ROOTS
        cls.use(roots)
        try:
            yield
        finally:
            cls.use(before)

    @classmethod
    def current(cls) -> DataRoots:
        """The roots this process declared (`use`), else the environment's (`from_env`)."""
        return _PROCESS_ROOTS if _PROCESS_ROOTS is not None else cls.from_env()

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.folders)

    def contains(self, path: Path) -> bool:
        """Whether the already-resolved `path` is a root or lies under one."""
        return any(path.is_relative_to(root) for root in self.folders)

    def resolve(self, value: str) -> Path:
        """The real folder `value` names (relative: from the first root), or DataPathError."""
        if "\x00" in value:
            raise DataPathError("contains a NUL byte")
        if not self.folders:
            raise DataPathError("no data roots are configured (RATEBENCH_DATA_ROOTS)")
        path = _real(self.folders[0] / value)  # an absolute value replaces the root
        if not self.contains(path):
            raise DataPathError(
                f"must name a folder under the data roots ({self.describe()}; set by the "
                f"operator in {ROOTS_VARIABLE}); a relative path starts at {self.folders[0]}"
            )
        return path


_PROCESS_ROOTS: DataRoots | None = None

# An absolute POSIX path: a slash not preceded by a word character, a dot, a slash or a colon
# (so neither `a/b` nor `http://host/x`), up to whitespace, quotes or punctuation.
_ABSOLUTE = re.compile(r"""(?<![\w./:~-])/[^\s'"`<>|,;:()\[\]{}]+""")


def redact_paths(text: str, roots: DataRoots | Sequence[Path]) -> str:
    """`text` with every absolute path outside `roots` replaced by `<path>` (compared after
    normalising `..`, without touching the file system)."""
    folders = roots.folders if isinstance(roots, DataRoots) else tuple(roots)

    def replace(match: re.Match[str]) -> str:
        path = Path(os.path.normpath(match.group(0)))
        if any(path.is_relative_to(root) for root in folders):
            return match.group(0)
        return "<path>"

    return _ABSOLUTE.sub(replace, text)


def public_paths(text: str, roots: DataRoots) -> str:
    """`text` with every absolute path replaced: under a root by `<data root>/<relative>`, any
    other by `<path>` (compared after normalising `..`, without touching the file system)."""

    def replace(match: re.Match[str]) -> str:
        path = Path(os.path.normpath(match.group(0)))
        for root in roots.folders:
            if path.is_relative_to(root):
                relative = path.relative_to(root).as_posix()
                return "<data root>" if relative == "." else f"<data root>/{relative}"
        return "<path>"

    return _ABSOLUTE.sub(replace, text)
