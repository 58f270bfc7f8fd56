"""Imports go service → worker → optim, never back; optim imports only torch and numpy."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"optim": {"worker", "service"}, "worker": {"service", "fastapi"}}
OPTIM_ALLOWED_THIRD_PARTY = {"torch", "numpy"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_goes_back_up_the_layers(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_optim_depends_on_torch_and_numpy_only() -> None:
    allowed = OPTIM_ALLOWED_THIRD_PARTY | set(sys.stdlib_module_names) | {"optim"}
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) - allowed)
        for path in (ROOT / "optim").rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}
