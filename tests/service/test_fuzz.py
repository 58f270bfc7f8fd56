"""A short schemathesis run (`scripts/fuzz`) against a real `ratebench serve` on each database,
with a fixed seed and a bounded number of examples: every generated request must be answered
without a 5xx and match the OpenAPI document, and so must the explicit hostile examples
(`scripts/fuzz.py`'s `EXPLICIT`), each with its expected status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
FUZZ = Path(__file__).parents[2] / "scripts" / "fuzz.py"


def test_fuzzing_finds_no_server_errors_or_schema_violations(database_url: str) -> None:
    result = subprocess.run(
        [sys.executable, str(FUZZ), "--max-examples", "3", "--seed", "0",
         "--database-url", database_url],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    summary = json.loads(lines[-1])
    assert summary["requests"] >= 500, summary
    assert summary["server_errors"] == 0, summary
    assert summary["failed_checks"] == {}, summary
    assert summary["explicit"]["cases"] >= 12 and summary["explicit"]["failed"] == [], summary
    assert result.returncode == 0, summary
