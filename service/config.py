"""All of ratebench's settings, in one object read from the environment (prefix `RATEBENCH_`).

Defaults give the embedded deployment: a SQLite file under `data_dir` and a Ray runtime started
in-process. The distributed deployment sets `RATEBENCH_DATABASE_URL` to PostgreSQL and
`RATEBENCH_RAY_ADDRESS` (or Ray's own `RAY_ADDRESS`) to the cluster's head.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:
    from worker.tasks import DataRoots

__all__ = ["Settings", "get_settings"]


class Settings(BaseSettings):
    """Environment variable `RATEBENCH_<FIELD>` sets each field (e.g. `RATEBENCH_PORT=9000`)."""

    model_config = SettingsConfigDict(env_prefix="RATEBENCH_", extra="ignore")

    data_dir: Path = Field(Path("data"), description="where the default SQLite file and plots live")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; default sqlite:///<data_dir>/ratebench.db"
    )
    database_password_file: Path | None = Field(
        None,
        description="a file holding the database password (a Docker secret), used with a "
        "database_url that has none, so that the password is in no URL and no environment",
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
    max_attempts: int = Field(
        8,
        ge=1,
        le=1000,
        description="attempts of a study that faults may end (a scheduler or Ray runtime that "
        "died, a lost actor, a cluster not ready): each is resumed from storage; the study "
        "fails at this many, with every attempt's cause",
    )
    anonymous_reads: bool = Field(True, description="allow GET endpoints without an API key")
    private_studies: bool = Field(
        False,
        description="a key reads only its own studies (an admin key every study), and others "
        "only once their owner marks them public; anonymous reads see public studies only",
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        le=1_000_000,
        description="requests one API key (an anonymous client: one address) may make per "
        "minute, refilled evenly, beyond a burst of `rate_limit_burst`; 0 turns it off",
    )
    rate_limit_burst: int = Field(
        120, ge=1, le=1_000_000, description="requests a key may make at once before the rate"
    )
    max_validation_s: float = Field(
        30.0,
        gt=0,
        le=600,
        description="seconds a submit's validation (model builds on the meta device) may take "
        "before it is refused",
    )
    max_step_memory_gb: float = Field(
        16.0,
        gt=0,
        description="estimated memory (GiB) one trial's training step may need, a cohort's "
        "task all its trials together: what one node can give a trial",
    )
    max_step_gflop: float = Field(
        10_000.0,
        gt=0,
        description="estimated floating-point operations (GFLOP) of one trial's training step",
    )
    max_body_bytes: int = Field(64_000, ge=1024, description="largest accepted request body")
    max_study_steps: int = Field(
        10_000_000,
        ge=1,
        description="most estimated optimizer steps per study: arms × (trials + final seeds) "
        "× epochs × steps per epoch",
    )
    max_queued_per_key: int = Field(
        20, ge=1, le=100_000, description="studies one API key may have waiting in the queue"
    )
    max_running_per_key: int = Field(
        4, ge=1, le=10_000, description="studies of one API key the scheduler runs at once"
    )
    max_running_studies: int = Field(
        4,
        ge=1,
        le=256,
        description="studies one scheduler runs at once on the shared Ray cluster, their "
        "trials shared round-robin over API keys, then over a key's studies",
    )
    api_threads: int = Field(
        32, ge=1, le=512, description="threads that run the API's database work (one per request)"
    )
    db_pool_size: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="database connections per process; default api_threads + 6 + "
        "2 × max_running_studies (the scheduler's claims, each running study's lease "
        "heartbeat and bookkeeping, /health); at least api_threads",
    )
    db_pool_timeout: float = Field(
        10.0, gt=0, le=300, description="seconds to wait for a free connection before a 503"
    )
    cifar_dir: Path | None = Field(
        None, description="directory holding cifar-10-batches-py / cifar-100-python"
    )
    data_roots: str | None = Field(
        None,
        description="folders (separated by os.pathsep, ':' on POSIX) that a spec's data.data_dir "
        "may name; default data_dir plus cifar_dir. A relative data_dir starts at the first",
    )

    log_format: Literal["text", "json"] = Field(
        "text",
        description="`json` logs one JSON object per line (timestamp, level, logger, message, "
        "study_id, trial_id) for log collectors; `text` is for people",
    )

    url: str | None = Field(
        None,
        description="the API the CLI client talks to; default http://127.0.0.1:<port>, so a "
        "RATEBENCH_PORT that moved the service moves the client with it",
    )
    api_key: str | None = Field(None, description="the key the CLI client sends")

    @model_validator(mode="after")
    def _pool_fits_threads(self) -> Settings:
        if self.db_pool_size is not None and self.db_pool_size < self.api_threads:
            raise ValueError(
                f"db_pool_size: {self.db_pool_size} is less than api_threads "
                f"({self.api_threads}); each API thread needs a connection"
            )
        return self

    def client_url(self) -> str:
        """The API the CLI talks to: `url`, else this machine's service at `port` (on loopback
        even when the service binds every interface)."""
        if self.url:
            return self.url
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::", ""} else self.host
        return f"http://{host}:{self.port}" if ":" not in host else f"http://[{host}]:{self.port}"

    def resolved_pool_size(self) -> int:
        """Connections per process: one per API thread, plus the scheduler's claims, two per
        running study (its heartbeat, its bookkeeping) and /health's."""
        if self.db_pool_size is not None:
            return self.db_pool_size
        return self.api_threads + 6 + 2 * self.max_running_studies

    def allowed_data_roots(self) -> DataRoots:
        """The folders spec paths may name (the worker computes the same from the environment,
        `worker.tasks.DataRoots.from_env`)."""
        from worker.tasks import DataRoots

        return DataRoots.configure(self.data_roots, self.data_dir, self.cifar_dir)

    def resolved_database_url(self) -> str:
        """The database URL to use, defaulting to a SQLite file in `data_dir`; with
        `database_password_file`, its password taken from that file."""
        if not self.database_url:
            return f"sqlite:///{(self.data_dir / 'ratebench.db').resolve()}"
        if self.database_password_file is None:
            return self.database_url
        return _with_password(self.database_url, self.database_password_file)


@lru_cache(maxsize=8)
def _with_password(url: str, password_file: Path) -> str:
    """`url` with the password read from `password_file` (once per process: the engine made
    from it keeps its connections anyway)."""
    import sqlalchemy as sa

    try:
        password = password_file.read_text().strip()
    except OSError as exc:
        raise ValueError(
            f"database_password_file: cannot read {password_file}: {exc.strerror}"
        ) from None
    with_password = sa.engine.make_url(url).set(password=password)
    return with_password.render_as_string(hide_password=False)


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
