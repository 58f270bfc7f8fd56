"""Fixtures shared by every test package: real databases and a real local Ray runtime.

PostgreSQL tests read the server from `RATEBENCH_TEST_POSTGRES_URL` (default: the local server
at 127.0.0.1:5432 as user postgres). When it cannot be reached they skip with the reason, unless
`RATEBENCH_REQUIRE_POSTGRES=1` (set by `.ci/run`), which turns the skip into a failure.

Ray's start-up timeout (`RATEBENCH_RAY_START_TIMEOUT_S`) defaults here to a generous 180 s, so
that a loaded machine makes the suite slower, not red; it is exported before anything imports
`ray`, and the services and CLIs the tests start inherit it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker import cluster

os.environ.setdefault(cluster.START_TIMEOUT_ENV, "180")
cluster.export_start_timeout()

# pytest-xdist's workers are given COLUMNS=80 and LINES=24, which every CLI process a test starts
# would inherit as a terminal's width; the CLI's output is tested as a pipe's, whose width is the
# output's own (a test that wants a width sets COLUMNS itself).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)
    os.environ.pop("LINES", None)

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"

# Fixtures that make every test using them, directly or through another fixture, `slow` (the
# marker's rule, pyproject.toml): each starts something, once per test or per test process.
SLOW_FIXTURES = {
    "ray_runtime": "starts a Ray runtime",
    "postgres_url": "creates a PostgreSQL database",
    "plugin_site": "runs pip install",
    "old_plugin_site": "runs pip install",
}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by the marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark what `SLOW_FIXTURES` names `slow`, and the users of the session's Ray runtime `ray`
    too, so that `-m "not slow"` starts neither Ray nor a database nor pip however a test
    reaches them."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SLOW_FIXTURES.keys():
            item.add_marker(pytest.mark.slow)
        if "ray_runtime" in used:
            item.add_marker(pytest.mark.ray)
        if "postgres_url" in used:
            item.add_marker(pytest.mark.postgres)


def _admin_url() -> str:
    return os.environ.get("RATEBENCH_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


def _postgres_unavailable(reason: str) -> None:
    if os.environ.get("RATEBENCH_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"PostgreSQL is required (RATEBENCH_REQUIRE_POSTGRES=1) but {reason}")
    pytest.skip(f"PostgreSQL unavailable: {reason}; set RATEBENCH_TEST_POSTGRES_URL")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """URL of a fresh, empty PostgreSQL database, dropped after the test."""
    import sqlalchemy as sa

    admin = sa.create_engine(_admin_url(), isolation_level="AUTOCOMMIT")
    name = f"ratebench_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        _postgres_unavailable(f"{_admin_url()} did not answer ({exc.orig})")
    url = admin.url.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """URL of a fresh SQLite file in the test's temporary directory."""
    return f"sqlite:///{tmp_path / 'ratebench.db'}"


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.slow])]
)
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs twice: on a SQLite file and on PostgreSQL (the PostgreSQL run is
    `slow`: its database is created and dropped, seconds on a loaded machine)."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(scope="session")
def ray_data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data root (`RATEBENCH_DATA_ROOTS`) of the session's Ray workers: a test that wants
    its trials to read files (a CIFAR folder) writes them under it."""
    return tmp_path_factory.mktemp("ray-data-root")


@pytest.fixture(scope="session")
def ray_runtime(ray_data_root: Path) -> Iterator[None]:
    """One local Ray runtime for the whole test session (starting one costs seconds)."""
    import ray

    from worker import cluster

    if not ray.is_initialized():
        workers_env = {"env_vars": {"RATEBENCH_DATA_ROOTS": str(ray_data_root)}}
        # Idle workers stay (up to 8, the most trials a test runs at once) instead of being
        # killed a second after their task beyond the CPU count: the next test's trials then
        # start in a warm process, not one that imports torch again.
        warm = {"num_workers_soft_limit": 8}
        cluster.connect(None, num_cpus=2, log_to_driver=False, runtime_env=workers_env,
                        _system_config=warm)  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_address(ray_runtime: None) -> str:
    """The session runtime's address, for the processes a test starts (a service, a scheduler,
    `ratebench run`) to join instead of each starting a Ray runtime of its own: a start costs
    seconds of both cores, and is what a busy machine times out first. Tests of the embedded
    runtime itself (`ratebench serve` with nothing set) do not use it."""
    import ray

    return str(ray.get_runtime_context().gcs_address)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread_per_test_process() -> None:
    """The tests' own torch work runs on one thread, as a trial does in a Ray task. Their
    networks are tiny, and on a loaded 2-core machine two intra-op threads per process spin
    against the other jobs: 300 SGD steps of test_transformed's MLP took 13 s on two threads
    and 0.3 s on one (load average 9)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One torch thread, as in a Ray task of one CPU: small networks run fastest so, and a
    computation replayed later (reversal, resumption) uses the same reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the example task plugin (examples/plugins/ratebench-friedman) ------------------------------

PLUGIN_SOURCE = Path(__file__).resolve().parents[1] / "examples" / "plugins" / "ratebench-friedman"


def _install_plugin(target: Path, version: str | None = None) -> Path:
    """`pip install --target` of a copy of the example plugin (at `version`, when given): a real
    install with its dist-info and entry points, into a folder of its own rather than the test
    venv, so that only the processes given that folder on their path have the plugin."""
    import shutil
    import subprocess
    import sys

    source = target.parent / f"{target.name}-source"
    shutil.copytree(PLUGIN_SOURCE, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    if version is not None:
        project = source / "pyproject.toml"
        project.write_text(
            project.read_text().replace('version = "0.1.0"', f'version = "{version}"')
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return target


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A site-packages folder holding the example plugin, ratebench-friedman 0.1.0."""
    return _install_plugin(tmp_path_factory.mktemp("plugin") / "site")


@pytest.fixture(scope="session")
def old_plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same plugin at another version, 0.0.9 (what a stale node would have)."""
    return _install_plugin(tmp_path_factory.mktemp("plugin-old") / "site", version="0.0.9")


@pytest.fixture
def plugin_installed(plugin_site: Path) -> Iterator[Path]:
    """The example plugin on this process's path, and the task registry read again (it reads
    the entry points once per process; a process started with the folder on its path would see
    it from the start). Removed afterwards."""
    import importlib
    import sys

    from worker.tasks import registry

    sys.path.insert(0, str(plugin_site))
    importlib.invalidate_caches()
    registry._installed.cache_clear()
    try:
        yield plugin_site
    finally:
        sys.path.remove(str(plugin_site))
        for name in [m for m in sys.modules if m.split(".")[0] == "ratebench_friedman"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        registry._installed.cache_clear()


@pytest.fixture
def examples_ready(plugin_installed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """What the example specs need besides ratebench: the example plugin (`friedman.json`) and
    `breast-cancer.json`'s arrays under a data root, written as README writes them. Returns the
    data root."""
    import numpy as np
    from sklearn.datasets import load_breast_cancer

    root = tmp_path / "example-data"
    monkeypatch.setenv("RATEBENCH_DATA_ROOTS", str(root))
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    (root / "breast-cancer").mkdir(parents=True)
    np.savez(root / "breast-cancer" / "data.npz", x_train=x[:450], y_train=y[:450],
             x_test=x[450:], y_test=y[450:])  # fmt: skip
    return root
