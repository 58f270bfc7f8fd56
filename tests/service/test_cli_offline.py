"""The offline commands load only what they use: `validate` checks a spec without the
service's database and API stack, and `run` on a study that already completed prints its
stored results without starting Ray (each in a fresh interpreter, where `sys.modules` says
what the command imported)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from service.db import get_engine, session_scope
from service.models import StudyRecord
from service.refusals import spec_hash
from tests.service.seeded import SPEC, seed_finished_study

pytestmark = pytest.mark.slow  # starts CLI processes

ROOT = Path(__file__).parents[2]
HEAVY = ("sqlalchemy", "alembic", "optuna", "fastapi", "ray", "matplotlib")


def _cli(*args: str) -> tuple[int, str, list[str]]:
    """`ratebench ARGS` in a fresh interpreter: exit code, stdout, and which of the `HEAVY`
    packages it imported (reported on stderr's last line)."""
    code = (
        "import sys\nfrom service.cli import main\n"
        f"code = main({list(args)!r})\nsys.stdout.flush()\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    loaded = json.loads(done.stderr.strip().splitlines()[-1].replace("'", '"'))
    return done.returncode, done.stdout, loaded


def test_validate_imports_no_database_or_api_stack() -> None:
    code, out, loaded = _cli("validate", str(ROOT / "examples" / "quick.json"))
    assert (code, out.strip()) == (0, "ok")
    assert loaded == []


def test_a_completed_study_is_printed_from_storage_without_starting_ray(tmp_path: Path) -> None:
    """A re-run of a completed `ratebench run` study reads its stored rows: Ray is never
    imported, the row is left as it was, and the JSON is the stored leaderboard."""
    from service.cli._run import default_study_key, load_spec

    path = tmp_path / "spec.json"
    path.write_text(json.dumps({**SPEC, "name": "rerun"}))
    spec = load_spec(path)
    key = default_study_key(spec)
    url = f"sqlite:///{tmp_path / 'ratebench.db'}"
    seed_finished_study(url, key, name="rerun")
    with session_scope(get_engine(url)) as session:  # as `ratebench run` left it
        study = session.get(StudyRecord, key)
        assert study is not None
        study.source, study.spec_hash = "cli", spec_hash(spec.model_dump(mode="json"))
        before = (study.attempts, study.started_at, study.finished_at)
        stored = {row.arm: row.summary for row in study.arm_results}
    code, out, loaded = _cli("run", str(path), "--database-url", url, "--json")
    assert code == 0, out
    assert "ray" not in loaded
    result = json.loads(out)
    assert result["status"] == "completed" and result["study_key"] == key
    assert {row["arm"]: row for row in result["arms"]} == stored
    with session_scope(get_engine(url)) as session:
        study = session.get(StudyRecord, key)
        assert study is not None
        assert (study.attempts, study.started_at, study.finished_at) == before
