"""requirements.lock, what scripts/setup installs, pins every requirement of pyproject.toml."""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_FIRST = {"torch"}  # scripts/setup installs PyTorch's own build before the lock


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_the_lock_pins_every_requirement_within_its_range() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    wanted = [*project["dependencies"], *(r for extra in extras for r in extra)]
    pins = _pins()
    problems = []
    for text in wanted:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        if name == project["name"]:  # an extra naming others ("ratebench[postgres]")
            continue
        if name in INSTALLED_FIRST:
            assert name not in pins, f"requirements.lock: {name} is installed by scripts/setup"
        elif name not in pins:
            problems.append(f"{text}: missing")
        elif not requirement.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{text}: the lock pins {pins[name]}")
    assert not problems, "requirements.lock is stale (run scripts/lock): " + "; ".join(problems)
