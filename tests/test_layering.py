"""Imports go ratebench → service → worker → optim, never back; optim imports only torch and
numpy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "optim": {"worker", "service", "ratebench"},
    "worker": {"service", "fastapi", "ratebench"},
    "service": {"ratebench"},
}
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


PACKAGES = ("ratebench", "service", "worker", "optim")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str, modules: set[str]) -> set[str]:
    """Our modules that `module` imports, whenever it does: statements at module level and
    inside functions alike (a function's import runs on its first call, and closes a cycle as
    surely), except under `if TYPE_CHECKING:` (never run); relative imports resolved,
    `from package import submodule` counted as the submodule."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If):
                test = child.test
                name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", "")
                if name == "TYPE_CHECKING":
                    for statement in child.orelse:
                        visit_statement(statement)
                    continue
            visit_statement(child)

    def visit_statement(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        else:
            visit(node)

    visit(tree)
    return {name for name in found if name in modules and name != module}


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    modules = set(paths)
    graph = {name: _imports(path, name, modules) for name, path in paths.items()}
    # The tuner registry imports each tuner's modules by name (`Tuner.arm_spec`, `checks`,
    # `arm_run`): those are imports too.
    from worker.arms import TUNERS

    for tuner in TUNERS.values():
        graph["worker.arms"] |= {f"{tuner.package}.{part}" for part in ("spec", "checks", "arm")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (`[a, b, ..., a]`), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_our_modules_import_one_another_without_cycles() -> None:
    """Imports inside functions count: `worker.spec`'s validator imports the checks when it
    first runs, and a cycle through it is a cycle."""
    graph = import_graph()
    assert "worker.arms.base" in graph["worker.sweep"]  # the graph sees our imports
    assert "worker.spec_checks" in graph["worker.spec"]  # and those inside functions
    assert find_cycle(graph) is None


def test_the_command_line_imports_heavy_libraries_only_in_the_commands_that_use_them() -> None:
    """`ratebench --help` and the HTTP client commands start in a fraction of a second: the
    parser imports neither the database layer, nor Optuna, Ray or PyTorch (each sub-command
    imports what it needs when it runs)."""
    heavy = ["sqlalchemy", "alembic", "optuna", "ray", "torch", "pandas", "fastapi"]
    probe = (
        "import sys, service.cli; service.cli._parser(); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
