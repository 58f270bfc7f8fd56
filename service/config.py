"""All of ratebench's settings, in one object read from the environment (prefix `RATEBENCH_`).

Defaults give the embedded deployment: a SQLite file under `data_dir` and a Ray runtime started
in-process. The distributed deployment sets `RATEBENCH_DATABASE_URL` to PostgreSQL and
`RATEBENCH_RAY_ADDRESS` (or Ray's own `RAY_ADDRESS`) to the cluster's head.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Environment variable `RATEBENCH_<FIELD>` sets each field (e.g. `RATEBENCH_PORT=9000`)."""

    model_config = SettingsConfigDict(env_prefix="RATEBENCH_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="where the default SQLite file and plots live")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ratebench.db"
    )
    ray_address: str | None = Field(
        None,
        validation_alias=AliasChoices("RATEBENCH_RAY_ADDRESS", "RAY_ADDRESS"),
        description="Ray cluster to join; unset starts a local Ray runtime in-process",
    )
    host: str = Field("127.0.0.1", description="address the API binds to")
    port: int = Field(8000, ge=1, le=65535, description="port the API binds to")
    run_scheduler: bool = Field(True, description="run the study scheduler inside the API process")
    lease_seconds: float = Field(
        30.0,
        ge=2,
        le=3600,
        description="a scheduler that stops renewing for this long loses "
        "its running study to the next scheduler",
    )
    anonymous_reads: bool = Field(True, description="allow GET endpoints without an API key")
    max_body_bytes: int = Field(64_000, ge=1024, description="largest accepted request body")
    db_pool_size: int = Field(5, ge=1, le=100, description="PostgreSQL connection pool size")
    cifar_dir: Path | None = Field(
        None, description="directory holding cifar-10-batches-py / cifar-100-python"
    )

    url: str = Field("http://127.0.0.1:8000", description="the API the CLI client talks to")
    api_key: str | None = Field(None, description="the key the CLI client sends")

    def resolved_database_url(self) -> str:
        """The database URL to use, defaulting to a SQLite file in `data_dir`."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'ratebench.db').resolve()}"


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
