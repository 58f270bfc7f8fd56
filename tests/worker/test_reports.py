"""Which jobs wait for the answer to each report, and how the reports of one that does not are
all stored (`Job.awaits_answers`, `ArmRun.record_result`), on a real SQLite storage, without Ray.

A job that no answer can stop (no pruner; a final seed) sends its epochs' objectives without
waiting; a note may still be in flight when its result arrives, and the driver then drops it
(the job has left `by_key`). The result's history must make up for every such note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from tests.worker.helpers import digits_spec
from worker.arms.base import Assignment
from worker.arms.optuna.arm import CohortJob
from worker.storage import open_storage
from worker.sweep import _arm_run
from worker.trial import EpochRecord, TrialResult


def _result(values: list[float]) -> TrialResult:
    history = [
        EpochRecord(epoch, 10 * epoch, 1.0, 1.0 - v, v, 0.1 * epoch, 100.0)
        for epoch, v in enumerate(values, start=1)
    ]
    return TrialResult("complete", values[-1], history, 10 * len(values), 1.0, 10, "cpu")


def _first_job(tmp_path: Path, **changes: Any) -> Any:
    spec = digits_spec({"resources": {"cohort_size": 1}}, **changes)
    storage = open_storage(f"sqlite:///{tmp_path / 'reports.db'}")
    arm = _arm_run(spec, 0, storage, "reports")
    job = arm.next_assignment()
    assert isinstance(job, Assignment)
    return job


def test_without_a_pruner_a_trial_reports_without_waiting(tmp_path: Path) -> None:
    assert _first_job(tmp_path).awaits_answers is False


@pytest.mark.parametrize("pruner", [{"name": "median"}, {"name": "hyperband"}])
def test_with_a_pruner_a_trial_waits_for_each_answer(tmp_path: Path, pruner: Any) -> None:
    assert _first_job(tmp_path, pruner=pruner).awaits_answers is True


def test_a_cohort_waits_when_any_member_does(tmp_path: Path) -> None:
    job = _first_job(tmp_path)
    cohort = CohortJob([job])
    assert cohort.awaits_answers is False
    job.arm.sweep.pruner = optuna.pruners.MedianPruner()
    assert cohort.awaits_answers is True


def test_the_epochs_whose_notes_did_not_arrive_are_stored_from_the_result(
    tmp_path: Path,
) -> None:
    job = _first_job(tmp_path)
    assert job.record_report(1, 0.25) is False  # a note that arrived: stored as sent
    job.record_result(_result([0.5, 0.6, 0.7]))
    frozen = job.arm.sweep.trials[0]
    assert frozen.state.name == "COMPLETE" and frozen.value == 0.7
    assert frozen.intermediate_values == {1: 0.25, 2: 0.6, 3: 0.7}


class _RecordedNotes:
    """Stands in for the mailbox actor's handle: `note.remote(...)` records the call (the
    actor's side is exercised by every sweep test on Ray)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, Any]] = []
        self.note = self

    def remote(self, key: str, index: int, payload: Any) -> None:
        self.sent.append((key, index, payload))


def test_a_trial_that_awaits_no_answer_sends_at_most_one_note_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Epochs of tens of milliseconds: the first epoch's note goes at once, then one per
    `NOTE_INTERVAL_S`; the result's history brings the rest (test above)."""
    from worker import remote

    now = [100.0]
    monkeypatch.setattr(remote, "_clock", lambda: now[0])
    mailbox = _RecordedNotes()
    reporter = remote._MailboxReporter(mailbox, "sgd/sweep/0", awaits=False)
    step = remote.NOTE_INTERVAL_S * 0.3
    for epoch in range(1, 9):
        assert reporter.report(epoch, 0.1 * epoch) is False  # never stopped
        now[0] += step
    # epochs 1..8 at 0, 0.3, ..., 2.1 intervals: notes at 0 (epoch 1) and 1.2 (epoch 5)
    assert [(key, index) for key, index, _ in mailbox.sent] == [
        ("sgd/sweep/0", 1),
        ("sgd/sweep/0", 5),
    ]
    member = reporter.under("sgd/sweep/1")  # a cohort's member keeps its own interval
    assert member.report(1, 0.5) is False
    assert mailbox.sent[-1] == ("sgd/sweep/1", 1, 0.5)
