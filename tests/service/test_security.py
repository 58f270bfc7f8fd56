"""What a key may do, and input the API must refuse with 4xx (never 500), on real databases:
ownership of studies, idempotency scoped per key, non-finite numbers and unstorable strings,
strict types, oversized chunked bodies, the compute budget and the per-key queue limits."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from fastapi.testclient import TestClient

from service import queue
from service.app import create_app
from service.auth import create_key
from service.config import Settings
from service.db import _alembic_config, get_engine, migrate, session_scope
from service.models import ApiKey, ArmResult, StudyRecord, StudyStatus
from tests.service.helpers import ratebench
from worker.spec import StudySpec

SPEC: dict[str, Any] = {
    "name": "security",
    "task": "mnist1d-mlp",
    "arms": [{"optimizer": "sgd", "fixed": {"momentum": 0.9}}],
    "budget": {"trials_per_arm": 2, "epochs": 1, "final_seeds": 1},
}
EXAMPLES = Path(__file__).parents[2] / "examples"


class Api:
    """A TestClient on a real database, with three keys: alice, bob and an admin."""

    def __init__(self, client: TestClient) -> None:
        self.client = client
        self.engine: sa.Engine = client.app.state.engine  # type: ignore[attr-defined]
        with session_scope(self.engine) as session:
            self.keys = {
                "alice": create_key(session, "alice").key,
                "bob": create_key(session, "bob").key,
                "admin": create_key(session, "admin", admin=True).key,
            }

    def headers(self, who: str, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}", **extra}

    def submit(self, who: str, spec: dict[str, Any] = SPEC, retry_key: str | None = None) -> Any:
        extra = {"Idempotency-Key": retry_key} if retry_key else {}
        return self.client.post("/api/v1/studies", json=spec, headers=self.headers(who, **extra))

    def post_raw(self, who: str, body: str) -> Any:
        """POST a JSON text as it is: NaN, Infinity and lone surrogates included."""
        headers = self.headers(who, **{"Content-Type": "application/json"})
        content = body.encode("utf-8", "surrogatepass")
        return self.client.post("/api/v1/studies", content=content, headers=headers)

    def count(self) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(StudyRecord)
            return int(conn.execute(query).scalar_one())


def make_api(database_url: str, tmp_path: Path, **settings: Any) -> Iterator[Api]:
    app = create_app(Settings(database_url=database_url, data_dir=tmp_path, **settings),
                     start_ray=False)  # fmt: skip
    with TestClient(app, raise_server_exceptions=False) as client:
        yield Api(client)


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    yield from make_api(database_url, tmp_path)


def test_only_the_submitter_or_an_admin_key_may_cancel(api: Api) -> None:
    first = api.submit("alice").json()["id"]
    second = api.submit("alice").json()["id"]
    refused = api.client.post(f"/api/v1/studies/{first}/cancel", headers=api.headers("bob"))
    assert refused.status_code == 403, refused.text
    assert "another API key" in refused.json()["detail"]
    assert api.client.get(f"/api/v1/studies/{first}").json()["status"] == "queued"
    own = api.client.post(f"/api/v1/studies/{first}/cancel", headers=api.headers("alice"))
    assert own.status_code == 200, own.text
    admin = api.client.post(f"/api/v1/studies/{second}/cancel", headers=api.headers("admin"))
    assert admin.status_code == 200, admin.text
    assert admin.json()["status"] == "cancelled"


def test_idempotency_keys_are_scoped_per_api_key_and_bodies_must_match(api: Api) -> None:
    alice = api.submit("alice", retry_key="run-1")
    bob = api.submit("bob", retry_key="run-1")
    assert (alice.status_code, bob.status_code) == (202, 202), (alice.text, bob.text)
    assert alice.json()["id"] != bob.json()["id"]  # bob never sees alice's study
    retry = api.submit("alice", retry_key="run-1")
    assert retry.status_code == 200, retry.text
    assert retry.json()["id"] == alice.json()["id"]
    other_body = api.submit("alice", {**SPEC, "name": "changed"}, retry_key="run-1")
    assert other_body.status_code == 409, other_body.text
    assert "run-1" in other_body.json()["detail"]
    assert alice.json()["id"] in other_body.json()["detail"]
    assert api.count() == 2


def _spec_text(**replacements: str) -> str:
    """SPEC as JSON text with `"<field>": <value>` pairs spliced into the top-level object."""
    text = json.dumps(SPEC)
    extra = ", ".join(f'"{name}": {value}' for name, value in replacements.items())
    return text[:-1] + ", " + extra + "}" if extra else text


# (JSON text, the field path the 422 must name)
BAD_BODIES: dict[str, tuple[str, list[Any]]] = {
    "nan": (_spec_text(seed="NaN"), ["body", "seed"]),
    "infinity": (_spec_text(budget='{"epochs": Infinity}'), ["body", "budget", "epochs"]),
    "minus-infinity": (
        _spec_text(search_space='{"lr": {"low": -Infinity, "high": 1}}'),
        ["body", "search_space", "lr", "low"],
    ),
    "1e400": (
        _spec_text(budget='{"epochs": 1, "trials_per_arm": 1e400}'),
        ["body", "budget", "trials_per_arm"],
    ),
    "nan-in-unknown-field": (_spec_text(whatever="[1, NaN]"), ["body", "whatever", 1]),
    "target-nan": (_spec_text(objective='{"target": NaN}'), ["body", "objective", "target"]),
    "lone-surrogate": (json.dumps(SPEC).replace('"security"', '"sec\\udc80"'), ["body", "name"]),
    "lone-surrogate-key": (_spec_text(**{"x\\ud800": "1"}), ["body", "x\\ud800"]),
    "nul": (json.dumps(SPEC).replace('"security"', '"sec\\u0000"'), ["body", "name"]),
    "epochs-as-string": (_spec_text(budget='{"epochs": "3"}'), ["body", "budget", "epochs"]),
    "epochs-as-bool": (_spec_text(budget='{"epochs": true}'), ["body", "budget", "epochs"]),
    "rate-as-string": (
        _spec_text(search_space='{"lr": {"low": "0.001", "high": 1}}'),
        ["body", "search_space", "lr", "low"],
    ),
}


def test_bad_numbers_and_strings_get_422_naming_the_field_and_store_nothing(api: Api) -> None:
    for case, (body, loc) in BAD_BODIES.items():
        response = api.post_raw("alice", body)
        assert response.status_code == 422, (case, response.status_code, response.text)
        locs = [item["loc"] for item in response.json()["detail"]]
        assert loc in locs, (case, locs)
    assert api.count() == 0


def test_bad_query_and_path_parameters_get_422_not_500(api: Api) -> None:
    api.submit("alice")
    for path, loc in [
        (f"/api/v1/studies?offset={2**64}", ["query", "offset"]),
        (f"/api/v1/studies?limit={2**64}", ["query", "limit"]),
        ("/api/v1/studies?task=mnist1d%00", ["query", "task"]),
        ("/api/v1/leaderboard?task=mnist1d%00-mlp", ["query", "task"]),
        ("/api/v1/studies/abc%00def", ["path"]),
        ("/api/v1/studies/abc%00def/trials", ["path"]),
    ]:
        response = api.client.get(path)
        assert response.status_code == 422, (path, response.status_code, response.text)
        assert loc in [item["loc"] for item in response.json()["detail"]], response.text


def test_a_chunked_body_over_the_limit_gets_413(sqlite_url: str, tmp_path: Path) -> None:
    for api in make_api(sqlite_url, tmp_path, max_body_bytes=4096):

        def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
            yield json.dumps(SPEC)[:-1].encode() + b', "pad": "'
            for _ in range(10):
                yield b"x" * 1000
            yield b'"}'

        headers = api.headers("alice", **{"Content-Type": "application/json"})
        response = api.client.post("/api/v1/studies", content=chunks(), headers=headers)
        assert response.status_code == 413, response.text
        assert api.count() == 0


def test_the_compute_budget_refuses_unbounded_studies_and_admits_the_examples(
    sqlite_url: str, tmp_path: Path, examples_ready: Path
) -> None:
    """Every example spec fits the default budget (with the data and the plugin it needs)."""
    limit = Settings().max_study_steps
    for example in sorted(EXAMPLES.glob("*.json")):
        spec = StudySpec.model_validate(json.loads(example.read_text()))
        assert spec.estimated_steps() <= limit, example.name
    huge = {
        **SPEC,
        "arms": [{"optimizer": "sgd", "label": f"a{i}"} for i in range(16)],
        "budget": {
            "trials_per_arm": 1000,
            "epochs": 1000,
            "steps_per_epoch": 100_000,
            "final_seeds": 3,
        },
    }
    assert StudySpec.model_validate(huge).estimated_steps() == 16 * 1003 * 1000 * 100_000
    for api in make_api(sqlite_url, tmp_path, max_study_steps=1000):
        response = api.submit("alice", huge)
        assert response.status_code == 422, response.text
        [item] = response.json()["detail"]
        assert item["loc"] == ["body", "budget"]
        assert "1,604,800,000,000" in item["msg"] and "1,000" in item["msg"]
        # SPEC: 1 arm × (2 trials + 1 seed) × 1 epoch × (3200 training examples // 128)
        assert StudySpec.model_validate(SPEC).estimated_steps() == 3 * 25
        assert api.submit("alice").status_code == 202
        assert api.count() == 1


def test_a_key_over_its_queued_limit_gets_429(database_url: str, tmp_path: Path) -> None:
    for api in make_api(database_url, tmp_path, max_queued_per_key=2):
        first = api.submit("alice").json()["id"]
        assert api.submit("alice").status_code == 202
        refused = api.submit("alice")
        assert refused.status_code == 429, refused.text
        assert "2 queued studies" in refused.json()["detail"]
        assert api.submit("bob").status_code == 202  # the limit is per key
        api.client.post(f"/api/v1/studies/{first}/cancel", headers=api.headers("alice"))
        assert api.submit("alice").status_code == 202  # room again
        assert api.count() == 4


def test_concurrent_submits_never_exceed_the_queued_limit(database_url: str) -> None:
    migrate(database_url)
    engine = get_engine(database_url)
    with session_scope(engine) as session:
        key_id = create_key(session, "burst").id
    limits = queue.KeyLimits(max_queued=3, max_running=1)
    outcomes: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        try:
            with session_scope(engine) as session:
                queue.submit(session, SPEC, name="s", task="t", api_key_id=key_id, limits=limits)
            outcomes.append("queued")
        except queue.TooManyStudiesError:
            outcomes.append("refused")

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["queued"] * 3 + ["refused"] * 5


def test_the_scheduler_starts_no_more_of_a_keys_studies_than_its_running_limit(
    database_url: str,
) -> None:
    migrate(database_url)
    engine = get_engine(database_url)
    with session_scope(engine) as session:
        alice, bob = create_key(session, "alice").id, create_key(session, "bob").id
        ids = [
            queue.submit(session, SPEC, name=f"s{i}", task="t", api_key_id=owner)[0].id
            for i, owner in enumerate([alice, alice, bob])
        ]
    lease = timedelta(seconds=30)
    claimed = [queue.claim_next(engine, "s", lease, max_running_per_key=1) for _ in range(3)]
    assert [c.id if c else None for c in claimed] == [ids[0], ids[2], None]
    with session_scope(engine) as session:
        assert queue.finish(session, ids[0], "s", StudyStatus.COMPLETED)
    again = queue.claim_next(engine, "s", lease, max_running_per_key=1)
    assert again is not None and again.id == ids[1]


def test_migration_0002_keeps_studies_and_scopes_idempotency_keys(database_url: str) -> None:
    config = _alembic_config(database_url)
    command.upgrade(config, "0001")
    engine = get_engine(database_url)
    with engine.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO ratebench_api_keys (name, key_hash, prefix, created_at) "
            "VALUES ('old', 'h', 'rb_', CURRENT_TIMESTAMP)"
        ))  # fmt: skip
        old_id = conn.execute(sa.text("SELECT id FROM ratebench_api_keys")).scalar_one()
        conn.execute(sa.text(
            "INSERT INTO ratebench_studies (id, name, task, spec, status, cancel_requested, "
            "idempotency_key, api_key_id, created_at, attempts) VALUES ('old', 'n', 't', '{}', "
            "'queued', false, 'k', :key, CURRENT_TIMESTAMP, 0)"
        ), {"key": old_id})  # fmt: skip
        conn.execute(sa.text(
            "INSERT INTO ratebench_arm_results (study_id, task, arm, scheme, metric, direction, "
            "rank, n_trials, n_diverged, summary) VALUES ('old', 't', 'sgd', 'sgd', 'm', 'd', "
            "1, 0, 0, '{}')"
        ))  # fmt: skip
    migrate(database_url)
    with engine.connect() as conn:  # rebuilding the studies table must not cascade to these
        assert conn.execute(sa.select(sa.func.count()).select_from(ArmResult)).scalar() == 1
    with session_scope(engine) as session:
        other = create_key(session, "new").id
        old, created = queue.submit(session, {}, name="n", task="t", idempotency_key="k",
                                    api_key_id=old_id)  # fmt: skip
        assert (old.id, created) == ("old", False)  # no hash stored before: taken as a retry
        _, created = queue.submit(session, SPEC, name="n", task="t", idempotency_key="k",
                                  api_key_id=other)  # fmt: skip
        assert created
        old_key = session.get(ApiKey, old_id)
        assert old_key is not None and not old_key.is_admin
    with engine.begin() as conn:  # 0001 allowed each idempotency key once, whoever sent it
        conn.execute(sa.delete(StudyRecord).where(StudyRecord.api_key_id == other))
    command.downgrade(config, "0001")
    command.upgrade(config, "head")


@pytest.mark.slow
def test_keys_create_admin_from_the_command_line(sqlite_url: str) -> None:
    key = ratebench("keys", "create", "--name", "ops", "--admin", "--database-url", sqlite_url)
    ratebench("keys", "create", "--name", "user", "--database-url", sqlite_url)
    listing = ratebench("keys", "list", "--database-url", sqlite_url).splitlines()
    assert key.strip().startswith("rb_")
    assert [line.split("\t")[2:4] for line in listing] == [["ops", "admin"], ["user", "key"]]
