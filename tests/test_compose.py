"""docker-compose.yml and docker/Dockerfile cannot run here (no Docker engine), so check what
they declare: one Python and one pinned Ray on every node, the CIFAR folder where CIFAR is read,
a small build context, a GPU example spec that a GPU worker can run; and the hardening: only
the API published (on the host's loopback, TLS by the `tls` profile's proxy), no Ray port or
dashboard reachable from outside, secrets from files (never in the file or the environment),
keyed reads by default, and no container of ours running as root."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
import yaml

from worker.spec import StudySpec

ROOT = Path(__file__).resolve().parents[1]
BUILT = ("api", "ray-head", "ray-worker")
RAY_NODES = ("ray-head", "ray-worker")
DATASETS = "/datasets"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (ROOT / "docker" / "Dockerfile").read_text()


def _arg_defaults(dockerfile: str) -> dict[str, str]:
    """`ARG NAME=value` defaults of the Dockerfile (an ARG redeclared without one inherits)."""
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", dockerfile, flags=re.MULTILINE))


def _lock_pin(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.lower().startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    raise AssertionError(f"requirements.lock pins no {name}")


def _build_args(service: dict[str, Any]) -> dict[str, str]:
    return {k: str(v) for k, v in (service["build"].get("args") or {}).items()}


def test_declares_the_four_roles_and_the_tls_proxy(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "ray-head", "api", "ray-worker", "proxy"}
    assert compose["services"]["proxy"]["profiles"] == ["tls"]  # started only when asked


def test_every_ratebench_service_is_built_from_the_one_dockerfile(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name in BUILT:
        build = services[name]["build"]
        assert (build["context"], build["dockerfile"]) == (".", "docker/Dockerfile"), name
        assert (ROOT / build["context"] / build["dockerfile"]).is_file()
    assert services["api"]["image"] == services["ray-head"]["image"]
    assert services["api"]["build"] == services["ray-head"]["build"]
    assert _build_args(services["ray-head"])["TORCH_VARIANT"] == "cpu"
    assert _build_args(services["ray-worker"])["TORCH_VARIANT"] == "gpu"
    assert "image" in services["postgres"] and "build" not in services["postgres"]


def test_one_base_image_and_python_for_every_variant(
    compose: dict[str, Any], dockerfile: str
) -> None:
    """Ray refuses nodes on another Python minor version: the CPU and GPU variants both start
    from the same Python image, and no service overrides its version."""
    stages = re.findall(r"^FROM (\S+)(?: AS (\S+))?$", dockerfile, flags=re.MULTILINE)
    names = {alias for _, alias in stages if alias}

    def is_stage(image: str) -> bool:  # FROM torch-${TORCH_VARIANT}: a stage for each variant
        return all(image.replace("${TORCH_VARIANT}", v) in names for v in ("cpu", "gpu"))

    external = {image for image, _ in stages if not is_stage(image)}
    assert external == {"python:${PYTHON_VERSION}-slim"}  # the only image from outside
    defaults = _arg_defaults(dockerfile)
    assert re.fullmatch(r"3\.\d+", defaults["PYTHON_VERSION"])
    assert {"torch-cpu", "torch-gpu"} <= names
    assert "FROM torch-${TORCH_VARIANT}" in dockerfile
    for name in BUILT:
        args = _build_args(compose["services"][name])
        assert "PYTHON_VERSION" not in args and "RAY_VERSION" not in args, name


def test_ray_is_pinned_to_the_locked_version(dockerfile: str) -> None:
    defaults = _arg_defaults(dockerfile)
    assert defaults["RAY_VERSION"] == _lock_pin("ray")
    assert '"ray[default]==${RAY_VERSION}"' in dockerfile
    assert "-c requirements.lock" in dockerfile  # every other package at its pinned version


def test_torch_is_the_version_the_tests_run_on(dockerfile: str) -> None:
    setup = (ROOT / "scripts" / "setup").read_text()
    [tested] = re.findall(r"RATEBENCH_TORCH_SPEC:-torch==([\w.]+)", setup)
    assert _arg_defaults(dockerfile)["TORCH_VERSION"] == tested
    assert "https://download.pytorch.org/whl/cpu" in dockerfile
    assert "https://download.pytorch.org/whl/${CUDA_WHEELS}" in dockerfile
    assert re.fullmatch(r"cu\d+", _arg_defaults(dockerfile)["CUDA_WHEELS"])


def test_postgres_has_a_volume_and_a_healthcheck(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert "pgdata" in compose["volumes"]


def test_ray_nodes_share_the_token_and_the_head(compose: dict[str, Any]) -> None:
    for name in ("api", "ray-head"):  # the database's only clients
        env = compose["services"][name]["environment"]
        assert env["RATEBENCH_DATABASE_URL"].startswith("postgresql+psycopg://"), name
        assert "@postgres:5432/" in env["RATEBENCH_DATABASE_URL"], name
    assert "RATEBENCH_DATABASE_URL" not in compose["services"]["ray-worker"]["environment"]
    for name in RAY_NODES:
        service = compose["services"][name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        assert env["RAY_worker_niceness"] == "0", name  # trials not starved by other work
        assert "RAY_AUTH_TOKEN" not in env, name  # no token in the environment
        assert env["RAY_AUTH_TOKEN_PATH"] == "/run/secrets/ray_auth_token", name
        assert "ray_auth_token" in service["secrets"], name
    worker = compose["services"]["ray-worker"]
    assert worker["environment"]["RAY_ADDRESS"] == "ray-head:6379"
    assert "--address=ray-head:6379" in worker["command"]


def test_the_api_serves_only_and_never_joins_ray(compose: dict[str, Any]) -> None:
    api = compose["services"]["api"]
    assert api["environment"]["RATEBENCH_RUN_SCHEDULER"] == "false"
    assert not any(k.startswith("RAY_") for k in api["environment"])  # no address, no token
    assert "ray_auth_token" not in api["secrets"]
    assert "/api/v1/health" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ratebench scheduler" in compose["services"]["ray-head"]["command"]


def test_cifar_is_mounted_where_it_is_read_and_is_the_data_root(compose: dict[str, Any]) -> None:
    """Workers read CIFAR; the API checks a submitted spec's files; the scheduler redacts
    paths outside the roots. All three see the same folder, read-only, as their only root."""
    for name in BUILT:
        service = compose["services"][name]
        [mount] = [v for v in service["volumes"] if f":{DATASETS}" in v]
        assert mount.endswith(f":{DATASETS}:ro"), name
        env = service["environment"]
        assert env["RATEBENCH_CIFAR_DIR"] == DATASETS, name
        assert env["RATEBENCH_DATA_ROOTS"] == DATASETS, name


def test_ray_worker_reserves_nvidia_gpus(compose: dict[str, Any]) -> None:
    devices = compose["services"]["ray-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_the_build_context_leaves_out_the_venv_git_and_outputs() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".git", "data", "datasets", "*.db"} <= ignored
    for copied in re.findall(
        r"^COPY (.+) \S+$", (ROOT / "docker" / "Dockerfile").read_text(), re.M
    ):
        for path in copied.split():
            assert path not in ignored, path  # what the image needs reaches the build


def test_the_gpu_example_spec_runs_on_gpu_workers() -> None:
    spec = StudySpec.model_validate(
        json.loads((ROOT / "examples/cifar10-resnet-gpu.json").read_text())
    )
    assert spec.resources.gpus_per_trial > 0
    assert spec.resources.device == "cuda"
    assert spec.task.startswith("cifar10-")
    assert spec.data.data_dir is None  # the workers' RATEBENCH_CIFAR_DIR


def _published(service: dict[str, Any]) -> list[str]:
    return [str(port) for port in service.get("ports") or []]


def test_only_the_api_is_published_and_only_on_the_hosts_loopback(
    compose: dict[str, Any],
) -> None:
    """The API answers plain HTTP: it is published on 127.0.0.1 (reach it from the host, or
    through a TLS proxy); the proxy of the `tls` profile is the only service on every
    interface, with HTTPS (and HTTP for the certificate's challenge and the redirect)."""
    services = compose["services"]
    assert _published(services["api"]) == ["127.0.0.1:8000:8000"]
    for name in ("postgres", "ray-head", "ray-worker"):
        assert _published(services[name]) == [], name  # no database, GCS or dashboard port
    assert sorted(_published(services["proxy"])) == ["443:443", "80:80"]
    caddyfile = (ROOT / "docker" / "Caddyfile").read_text()
    assert "reverse_proxy api:8000" in caddyfile
    assert "./docker/Caddyfile:/etc/caddy/Caddyfile:ro" in services["proxy"]["volumes"]
    assert services["proxy"]["environment"]["RATEBENCH_DOMAIN"].startswith("${RATEBENCH_DOMAIN:?")


def test_the_ray_dashboard_listens_inside_the_head_only(compose: dict[str, Any]) -> None:
    """Its token allows job submission, that is running code: no other container reaches it."""
    command = compose["services"]["ray-head"]["command"]
    assert "--dashboard-host=127.0.0.1" in command and "0.0.0.0" not in command


def test_reads_need_a_key_unless_the_operator_opens_them(compose: dict[str, Any]) -> None:
    env = compose["services"]["api"]["environment"]
    assert env["RATEBENCH_ANONYMOUS_READS"] == "${RATEBENCH_ANONYMOUS_READS:-false}"


def test_secrets_come_from_files_never_from_the_compose_file(compose: dict[str, Any]) -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    assert "POSTGRES_PASSWORD:" not in text and ":ratebench@" not in text  # no literal password
    assert compose["secrets"] == {
        "postgres_password": {"file": "./secrets/postgres_password"},
        "ray_auth_token": {"file": "./secrets/ray_auth_token"},
    }
    postgres = compose["services"]["postgres"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    for name in ("api", "ray-head"):
        service = compose["services"][name]
        env = service["environment"]
        assert env["RATEBENCH_DATABASE_PASSWORD_FILE"] == "/run/secrets/postgres_password"
        assert ":" not in env["RATEBENCH_DATABASE_URL"].split("@")[0].split("//")[1], name
        assert "postgres_password" in service["secrets"], name
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "secrets" in ignored  # never copied into an image
    assert "secrets/" in (ROOT / ".gitignore").read_text().split()


def test_the_database_password_file_completes_the_url(tmp_path: Path) -> None:
    from service.config import Settings

    secret = tmp_path / "postgres_password"
    secret.write_text("s3cret/with:odd@chars\n")
    settings = Settings(
        database_url="postgresql+psycopg://ratebench@postgres:5432/ratebench",
        database_password_file=secret,
    )
    url = sa.engine.make_url(settings.resolved_database_url())
    assert (url.username, url.password, url.host) == (
        "ratebench",
        "s3cret/with:odd@chars",
        "postgres",
    )


def test_no_container_of_ours_runs_as_root(compose: dict[str, Any], dockerfile: str) -> None:
    users = re.findall(r"^USER (\S+)$", dockerfile, flags=re.MULTILINE)
    assert users and users[-1].split(":")[0] not in ("root", "0")  # the image's last USER
    assert "useradd --uid 10001" in dockerfile
    for name in BUILT:
        service = compose["services"][name]
        assert str(service.get("user", "10001")).split(":")[0] not in ("root", "0"), name
        assert "no-new-privileges:true" in service["security_opt"], name
