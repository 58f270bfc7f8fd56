"""Output the commands write by default stays out of commits: `ratebench plot --out plots/` (as
README gives it) and `result.plots("plots/")`, run from the checkout's root or any folder in it."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "path", ["plots/quick-mnist1d-mlp-sensitivity.png", "examples/plots/study-curves.svg"]
)
def test_plot_output_is_ignored(path: str) -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(
        ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, timeout=30, check=False
    )
    assert result.returncode == 0, f"{path} is not ignored"


def test_tracked_plot_code_is_not_ignored() -> None:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("service/plots.py", "worker/report/plots.py", "docs/figures/study_page.png"):
        result = subprocess.run(
            ["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT, timeout=30, check=False
        )
        assert result.returncode == 1, f"{path} is ignored"
