"""A short, bounded chaos soak (`scripts/chaos`): a real service on a private PostgreSQL with
two studies training and readers polling, while a trial worker, Ray's dashboard agent (the
raylet dies with it) and the database are killed in turn. Every study must complete with each
configuration and final seed finished once, nothing left running, and no 5xx while the
database was up; each fault meets a running study (a fast machine gets another wave of studies
when the first has ended). The mailbox, the raylet alone and the service's own restart have
tests of their own (tests/service/test_faults.py, test_e2e.py); docs/operations.md states the
10-minute soak."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.private_postgres import unavailable_reason

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.ray]
CHAOS = Path(__file__).parents[2] / "scripts" / "chaos.py"


@pytest.mark.timeout(1800)
def test_a_short_soak_loses_no_study_and_answers_no_5xx_while_the_database_is_up(
    tmp_path: Path,
) -> None:
    reason = unavailable_reason()
    if reason is not None:
        pytest.fail(f"the soak needs a private PostgreSQL server: {reason}")
    out = tmp_path / "summary.json"
    result = subprocess.run(
        [sys.executable, str(CHAOS), "--minutes", "1.25", "--studies", "2", "--rates", "4",
         "--epochs", "12", "--readers", "6", "--fault-every", "15", "25",
         "--faults", "trial_worker,agent,postgres", "--settle-minutes", "20",
         "--out", str(out)],
        capture_output=True, text=True, timeout=1700,
    )  # fmt: skip
    assert out.exists(), result.stderr[-4000:]
    summary = json.loads(out.read_text())
    assert summary["checks"] == {
        "every_study_completed": True,
        "every_configuration_and_seed_once": True,
        "no_5xx_while_database_up": True,
        "every_fault_kind_injected": True,
        "every_fault_met_a_running_study": True,
    }, json.dumps(summary, indent=1)[-6000:]
    assert result.returncode == 0
