"""GET /health: 200 when Postgres answers and migrations are applied, 503 SERVICE_UNAVAILABLE otherwise.

Each case runs on its own throwaway database on the session's server, so the shared schema is
never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asgi_lifespan import LifespanManager

from bap_engine.app import create_app
from bap_engine.config import Settings
from tests.conftest import ResponseLog, assert_envelope, client_for, open_app, pk, register_product, wait_until


def _with_database(dsn: str, name: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + name))


@contextlib.asynccontextmanager
async def throwaway_database(pg_dsn: str) -> AsyncIterator[str]:
    name = f"bap_health_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(pg_dsn, name)
        finally:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_health_reflects_migrations(settings: Settings, pg_dsn: str, response_log: ResponseLog) -> None:
    async with throwaway_database(pg_dsn) as dsn:
        async with open_app(settings.model_copy(update={"database_url": dsn}), response_log) as (_, client):
            r = await client.get("/health")
            assert r.status_code == 200 and r.json() == {"status": "ok"}
            conn = await asyncpg.connect(dsn)
            try:
                head = await conn.fetchval("SELECT version_num FROM alembic_version")
                # an unknown (older or newer) schema version: not ready
                await conn.execute("UPDATE alembic_version SET version_num = 'not-head'")
                assert_envelope(await client.get("/health"), 503, "SERVICE_UNAVAILABLE")
                await conn.execute("UPDATE alembic_version SET version_num = $1", head)
                assert (await client.get("/health")).status_code == 200
                # migrations not applied at all
                await conn.execute("DROP TABLE alembic_version")
                assert_envelope(await client.get("/health"), 503, "SERVICE_UNAVAILABLE")
            finally:
                await conn.close()


async def test_fresh_database_is_migrated_at_start(settings: Settings, pg_dsn: str) -> None:
    """An app on an empty database applies the migrations before it reports ready."""
    async with throwaway_database(pg_dsn) as dsn:
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT to_regclass('alembic_version')") is None
            async with open_app(settings.model_copy(update={"database_url": dsn})) as (app, client):
                assert (await client.get("/health")).json() == {"status": "ok"}
                assert await app.state.services.ready() is True
            assert await conn.fetchval("SELECT count(*) FROM alembic_version") == 1
        finally:
            await conn.close()


async def test_database_refusing_connections_is_service_unavailable(
    settings: Settings, pg_dsn: str, response_log: ResponseLog
) -> None:
    async with throwaway_database(pg_dsn) as dsn:
        name = urlsplit(dsn).path[1:]
        application = create_app(settings.model_copy(update={"database_url": dsn}))
        async with LifespanManager(application), client_for(application, response_log,
                                                             raise_app_exceptions=False) as client:
            _, key = await register_product(client)
            admin = await asyncpg.connect(pg_dsn)
            try:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
                assert_envelope(await client.get("/health"), 503, "SERVICE_UNAVAILABLE")
                for method, path in (("GET", "/engines"), ("POST", "/engines/u1/admit"), ("GET", "/status")):
                    assert_envelope(await client.request(method, path, headers=pk(key)), 503, "SERVICE_UNAVAILABLE")
            finally:
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                await admin.close()


async def test_a_task_failing_repeatedly_takes_the_replica_out_of_rotation(settings: Settings) -> None:
    """/health names a supervised task that keeps failing (503), and is ok again once it recovers."""
    healed = asyncio.Event()

    async def flaky() -> None:
        if not healed.is_set():
            raise RuntimeError("cannot reach what I heal")
        services.supervisor.ok("flaky-task")
        await asyncio.Event().wait()

    async with open_app(settings) as (app, client):
        services = app.state.services
        services.supervisor.start("flaky-task", flaky)
        await wait_until(lambda: services.supervisor.failing() == ["flaky-task"], timeout=30)
        r = await client.get("/health")
        assert_envelope(r, 503, "SERVICE_UNAVAILABLE")
        assert "flaky-task" in r.json()["error"]["message"]
        healed.set()
        await wait_until(lambda: services.supervisor.failing() == [], timeout=60)
        assert (await client.get("/health")).json() == {"status": "ok"}


async def test_a_timeout_is_not_reported_as_a_database_outage(settings: Settings, response_log: ResponseLog) -> None:
    application = create_app(settings)

    async def times_out() -> None:
        raise TimeoutError("an engine took too long")

    application.add_api_route("/_test/timeout", times_out)
    async with LifespanManager(application), client_for(application, response_log,
                                                         raise_app_exceptions=False) as client:
        r = await client.get("/_test/timeout")
        assert_envelope(r, 503, "SERVICE_UNAVAILABLE")
        assert "database" not in r.json()["error"]["message"]
