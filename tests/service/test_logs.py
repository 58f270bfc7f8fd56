"""Logging as `ratebench serve` and `ratebench scheduler` configure it: JSON lines carrying the
study and trial ids of the scheduler's context, or the plain text format."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from pydantic import ValidationError

from service.config import Settings
from service.db import get_engine
from service.logs import configure_logging, log_context
from service.scheduler import SchedulerConfig, StudyDriver
from tests.service.helpers import wait_for


@pytest.fixture
def root_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test configures it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.mark.usefixtures("root_logging")
def test_json_lines_carry_the_study_and_trial_ids_of_their_context() -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    log = logging.getLogger("service.scheduler")
    with log_context(study_id="s123"):
        log.info("running study %s", "s123")
        log.warning("trial failed", extra={"trial_id": "sgd/sweep/4", "attempt": 2})
        # a thread of its own does not inherit the context (the scheduler's heartbeat is
        # started with a copy of it)
        thread = threading.Thread(target=lambda: log.info("elsewhere"))
        thread.start()
        thread.join()
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("study failed")
    log.debug("below the level")
    log.info("after the study")
    first, second, elsewhere, failed, after = lines(stream)
    assert first["message"] == "running study s123"
    assert first["level"] == "INFO" and first["logger"] == "service.scheduler"
    assert first["timestamp"].endswith("+00:00") and "T" in first["timestamp"]
    assert first["study_id"] == "s123" and "trial_id" not in first
    assert second["study_id"] == "s123" and second["trial_id"] == "sgd/sweep/4"
    assert second["attempt"] == 2 and second["level"] == "WARNING"
    assert elsewhere["message"] == "elsewhere" and "study_id" not in elsewhere
    assert failed["study_id"] == "s123" and "ValueError: boom" in failed["exception"]
    assert after["message"] == "after the study" and "study_id" not in after


@pytest.mark.usefixtures("root_logging")
def test_the_lease_heartbeat_logs_with_the_study_id_of_its_scheduler(sqlite_url: str) -> None:
    stream = io.StringIO()
    configure_logging("info", "json", stream)
    engine = get_engine(sqlite_url)  # never migrated: every renewal fails, and says so
    config = SchedulerConfig(storage_url=sqlite_url, lease_seconds=0.3, scheduler_id="a")
    with log_context(study_id="s9"), StudyDriver(engine, "s9", config):
        wait_for(lambda: "lease renewal failed" in stream.getvalue(), 60, "a failed renewal", 0.05)
    failed = next(line for line in lines(stream) if "lease renewal failed" in line["message"])
    assert failed["study_id"] == "s9" and failed["logger"] == "service.scheduler"


@pytest.mark.usefixtures("root_logging")
def test_text_logs_keep_their_format() -> None:
    stream = io.StringIO()
    configure_logging("warning", "text", stream)
    with log_context(study_id="s1"):
        logging.getLogger("service.app").info("not shown")
        logging.getLogger("service.app").warning("database unavailable")
    assert stream.getvalue() == "WARNING service.app: database unavailable\n"


def test_the_log_format_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RATEBENCH_LOG_FORMAT", raising=False)
    assert Settings().log_format == "text"
    monkeypatch.setenv("RATEBENCH_LOG_FORMAT", "json")
    assert Settings().log_format == "json"
    monkeypatch.setenv("RATEBENCH_LOG_FORMAT", "xml")
    with pytest.raises(ValidationError, match="log_format"):
        Settings()
