"""Shared fixtures: one Postgres per test run, settings on tmp_path, the app and its client.

- `pg_dsn` (session): `ORCH_TEST_DATABASE_URL`, or an embedded `pgserver` in a private /tmp dir;
  migrated once. Only tests that ask for it (directly or through `settings`) start it.
- `settings`: a unique deployment, a unique 40-port range and data_dir on tmp_path. Its teardown
  destroys every engine process the test left under `tmp_path/engines` (whatever app created
  it) and asserts that nothing is left, so no engine outlives its test.
- `app` / `client`: `create_app(settings)` inside `asgi_lifespan.LifespanManager`, driven by
  `httpx.AsyncClient(transport=ASGITransport(app))`. The client records every response; at
  teardown no key may appear in any body except where the contract returns it.

Tests are isolated by unique product slugs, never by truncation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import os
import random
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from pathlib import Path

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager
from cryptography.fernet import Fernet
from fastapi import FastAPI

from bap_engine.api.deps import Services
from bap_engine.app import create_app
from bap_engine.backends.subprocess import SubprocessBackend, SubprocessConfig
from bap_engine.config import Settings
from bap_engine.db import migrate
from bap_engine.db.embedded import embedded_postgres
from bap_engine.registry import OWNER_GRACE_S
from tests.log_scan import record_secrets

# At session end, every log the run wrote is scanned for keys and for these values (tests/log_scan.py).
pytest_plugins = ("tests.log_scan",)

ADMIN_KEY = "adm-test-" + uuid.uuid4().hex
record_secrets(ADMIN_KEY)
PORTS_PER_TEST = 40
_PORT_LOW, _PORT_HIGH = 20000, 29999
_port_blocks = itertools.count(random.randrange((_PORT_HIGH - _PORT_LOW + 1) // PORTS_PER_TEST))

# Paths whose 2xx answers legitimately carry a key (see spec/API.md "Keys"), as full-match patterns.
_PLATFORM_KEY_PATHS = ("/products/register", "/products/[^/]+/rotate-platform-key")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]], timeout: float, interval: float = 0.02
) -> None:
    """Poll `predicate` (sync or async) until true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def unique_slug(prefix: str = "p") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


async def register_product(
    client: httpx.AsyncClient, policy: dict[str, object] | None = None, slug: str | None = None
) -> tuple[str, str]:
    """Register a product with a unique slug through the admin API. Returns (product_id, platform key)."""
    body: dict[str, object] = {"slug": slug or unique_slug(), "display_name": "Test product"}
    if policy is not None:
        body["policy"] = policy
    r = await client.post("/products/register", json=body, headers={"X-Admin-Key": ADMIN_KEY})
    assert r.status_code == 200, r.text
    doc = r.json()
    return str(doc["product_id"]), str(doc["platform_api_key"])


def pk(key: str) -> dict[str, str]:
    """The platform-key header."""
    return {"X-Platform-Key": key}


def assert_envelope(r: httpx.Response, status: int, code: str) -> None:
    """The response is exactly {"error": {"code", "message"}} with this status and code."""
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    assert set(doc) == {"error"}, doc
    assert set(doc["error"]) == {"code", "message"}, doc
    assert doc["error"]["code"] == code, doc
    assert isinstance(doc["error"]["message"], str) and doc["error"]["message"], doc


def services_of(app: FastAPI) -> Services:
    services = app.state.services
    assert isinstance(services, Services)
    return services


def pool_of(app: FastAPI) -> asyncpg.Pool:
    pool = app.state.services.lifecycle.pool
    assert isinstance(pool, asyncpg.Pool)
    return pool


def engine_dir(settings: Settings, engine_id: str) -> Path:
    return settings.data_dir / "engines" / engine_id


async def insert_engine_row(
    pool: asyncpg.Pool, settings: Settings, product_id: str, user_id: str, status: str = "stopped", *,
    port: int | None = None, created_at: datetime | None = None, engine_id: str | None = None,
) -> str:
    """A bare `engines` row with no process behind it (for paths that never reach the backend)."""
    assert settings.master_key is not None
    engine_id = engine_id or str(uuid.uuid4())
    fake_key = "sk-sept-" + uuid.uuid4().hex + uuid.uuid4().hex
    sealed = Fernet(settings.master_key.encode()).encrypt(fake_key.encode()).decode()
    await pool.execute(
        "INSERT INTO engines (id, product_id, user_id, status, port, url, engine_version, api_key_hash, "
        "engine_key_enc, created_at) VALUES ($1, $2, $3, $4, $5, $6, 'test-version', $7, $8, "
        "coalesce($9, now()))",
        engine_id, product_id, user_id, status, port, None if port is None else f"http://127.0.0.1:{port}",
        hashlib.sha256(fake_key.encode()).hexdigest(), sealed, created_at,
    )
    return engine_id


class ResponseLog:
    """Every response seen by a test client, with the secrets to look for in them."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = list(secrets)
        self.responses: list[tuple[str, str, int, str]] = []

    async def hook(self, response: httpx.Response) -> None:
        await response.aread()
        path = response.request.url.path
        text = response.text
        self.responses.append((response.request.method, path, response.status_code, text))
        if 200 <= response.status_code < 300 and response.request.method != "HEAD" and response.headers.get(
            "content-type", "").startswith("application/json"):  # a HEAD answer has the headers, not the body
            doc = response.json()
            if isinstance(doc, dict):
                for name in ("platform_api_key", "api_key", "secret"):
                    if isinstance(doc.get(name), str):
                        self.secrets.append(doc[name])
                engine = doc.get("engine")
                if isinstance(engine, dict) and isinstance(engine.get("api_key"), str):
                    self.secrets.append(engine["api_key"])

    def check(self, admin_key: str, master_key: str) -> None:
        """No key in an error body; platform keys only from register; engine keys only where returned;
        a webhook secret only in the answer of the PUT that made it."""
        platform = {s for s in self.secrets if s.startswith("pk-sept-")}
        engine = {s for s in self.secrets if s.startswith("sk-sept-")}
        webhook = {s for s in self.secrets if s.startswith("whsec_")}
        for method, path, status, text in self.responses:
            assert admin_key not in text and master_key not in text, (method, path)
            allowed: set[str] = set()
            if 200 <= status < 300:
                if any(re.fullmatch(p, path) for p in _PLATFORM_KEY_PATHS):
                    allowed |= platform
                if _returns_engine_key(method, path):
                    allowed |= engine
                if method == "PUT" and path.endswith("/webhook"):
                    allowed |= {s for s in webhook if s in text}  # its own secret, shown once
            for secret in (platform | engine | webhook) - allowed:
                assert secret not in text, f"a key leaked in {method} {path} ({status})"


def _returns_engine_key(method: str, path: str) -> bool:
    parts = path.strip("/").split("/")
    if parts[0] != "engines" or len(parts) < 2:
        return False
    if method in ("GET", "PATCH"):  # PATCH answers with the engine object of GET
        return len(parts) == 2
    return method == "POST" and (parts[1] == "provision" or (len(parts) == 3 and parts[2] in ("admit", "rotate-key")))


async def audit_rows_containing(dsn: str, secrets: list[str]) -> list[str]:
    """Audit rows whose metadata or actor contain any of the secrets (must be none)."""
    if not secrets:
        return []
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT id::text FROM audit_log WHERE metadata::text LIKE ANY($1::text[]) "
            "OR actor LIKE ANY($1::text[]) OR coalesce(user_id, '') LIKE ANY($1::text[])",
            [f"%{s}%" for s in secrets],
        )
    finally:
        await conn.close()
    return [r["id"] for r in rows]


async def destroy_leftover_engines(settings: Settings, dsn: str) -> None:
    """Kill and remove every engine this test left (its processes and data), and their rows."""
    backend = SubprocessBackend(
        SubprocessConfig(data_dir=settings.data_dir.resolve(), command=settings.engine_argv,
                         deployment=settings.deployment)
    )
    managed = await backend.list_managed()
    for observed in managed:
        await backend.destroy(observed.engine_id)
    await backend.close()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(
            "DELETE FROM engines WHERE id = ANY($1::uuid[]) OR port BETWEEN $2 AND $3",
            [o.engine_id for o in managed], settings.port_min, settings.port_max,
        )
        # a warm pool asked for by this test must not be kept by a later test's leader
        await conn.execute("UPDATE products SET policy = policy - 'warm_pool' WHERE policy ? 'warm_pool'")
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
async def pg_dsn() -> AsyncIterator[str]:
    """One migrated Postgres for the whole run.

    The embedded server lives outside pytest's tmp root: run as root, pgserver hands its data
    directory to a `pgserver` user, and another pytest run resets pytest-of-<user> to 0700."""
    url = os.environ.get("ORCH_TEST_DATABASE_URL")
    if url:
        await migrate.upgrade(url)
        yield url
        return
    base = Path(tempfile.mkdtemp(prefix="bap-test-pg-"))
    try:
        async with embedded_postgres(base) as dsn:
            await migrate.upgrade(dsn)
            await wait_out_owner_grace(dsn)
            yield dsn
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def wait_out_owner_grace(dsn: str) -> None:
    """Ops of dead owners are taken over only once Postgres has been up OWNER_GRACE_S (see registry):
    tests that simulate a dead owner need a server older than that."""
    conn = await asyncpg.connect(dsn)
    try:
        uptime = await conn.fetchval("SELECT extract(epoch FROM now() - pg_postmaster_start_time())")
    finally:
        await conn.close()
    await asyncio.sleep(max(0.0, OWNER_GRACE_S + 0.5 - float(uptime)))


def next_port_range() -> tuple[int, int]:
    blocks = (_PORT_HIGH - _PORT_LOW + 1) // PORTS_PER_TEST
    low = _PORT_LOW + (next(_port_blocks) % blocks) * PORTS_PER_TEST
    return low, low + PORTS_PER_TEST - 1


@pytest.fixture
def master_key() -> str:
    key = Fernet.generate_key().decode()
    record_secrets(key)  # no log of the run may contain it
    return key


@pytest.fixture
async def settings(pg_dsn: str, tmp_path: Path, master_key: str) -> AsyncIterator[Settings]:
    port_min, port_max = next_port_range()
    s = Settings(
        database_url=pg_dsn, master_key=master_key, admin_key=ADMIN_KEY, data_dir=tmp_path,
        port_min=port_min, port_max=port_max, boot_timeout_s=15, stop_grace_s=5, workers_enabled=False,
        deployment=f"t-{uuid.uuid4().hex[:12]}",
    )
    yield s
    await destroy_leftover_engines(s, pg_dsn)
    engines = tmp_path / "engines"
    left = sorted(p.name for p in engines.iterdir()) if engines.exists() else []
    assert left == [], f"engine data left behind: {left}"


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[FastAPI]:
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60):
        yield application


@pytest.fixture
async def response_log(settings: Settings, pg_dsn: str) -> AsyncIterator[ResponseLog]:
    """Records responses; at teardown no key may be in a body where the contract does not return it,
    nor in any audit row."""
    assert settings.master_key is not None
    log = ResponseLog([ADMIN_KEY, settings.master_key])
    yield log
    log.check(ADMIN_KEY, settings.master_key)
    assert await audit_rows_containing(pg_dsn, log.secrets) == []


@pytest.fixture
async def client(app: FastAPI, response_log: ResponseLog) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app, response_log) as c:
        yield c


@contextlib.asynccontextmanager
async def client_for(
    app: FastAPI, log: ResponseLog | None = None, *, raise_app_exceptions: bool = True
) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the app's ASGI transport (recording into `log` if given). With
    raise_app_exceptions=False an unhandled error is seen as the 500 the server would send."""
    hooks = {"response": [log.hook]} if log is not None else {}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=raise_app_exceptions)
    async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60, event_hooks=hooks) as c:
        yield c


@contextlib.asynccontextmanager
async def open_app(
    settings: Settings, log: ResponseLog | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """A second (or differently configured) app with its lifespan running, and a client on it."""
    application = create_app(settings)
    async with LifespanManager(application, startup_timeout=60, shutdown_timeout=60), client_for(
        application, log
    ) as c:
        yield application, c
