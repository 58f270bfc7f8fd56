"""`worker.storage`: the Optuna storage opens on a fresh machine, where no folder exists yet."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.storage import make_sqlite_folder, open_storage


def test_open_storage_creates_the_sqlite_files_folder(tmp_path: Path) -> None:
    db = tmp_path / "data" / "nested" / "optuna.db"
    storage = open_storage(f"sqlite:///{db}")
    try:
        storage.create_new_study([], "fresh")
    finally:
        storage.engine.dispose()
    assert db.is_file()


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:"])
def test_in_memory_urls_make_no_folder(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    make_sqlite_folder(url)
    assert list(tmp_path.iterdir()) == []


def test_server_urls_are_left_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    make_sqlite_folder("postgresql+psycopg://postgres@127.0.0.1:5432/some/where")
    assert list(tmp_path.iterdir()) == []
