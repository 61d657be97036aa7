"""Health worker on real engines: crash → failed → restarted; backoff → gave up."""

from __future__ import annotations

import os
import signal

import asyncpg
import httpx

from bap_engine.config import Settings
from bap_engine.lifecycle import probe_health
from bap_engine.workers.health import HealthWorker, backoff_s
from tests.conftest import pk, register_product, wait_until
from tests.workers.conftest import AppFactory, engine_pid, flaky_engine_command, lifecycle_of


async def actions(dsn: str, engine_id: str) -> list[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT action FROM audit_log WHERE engine_id = $1 ORDER BY id", engine_id)
    finally:
        await conn.close()
    return [r["action"] for r in rows]


async def admit_new(client: httpx.AsyncClient, key: str, user: str) -> dict[str, object]:
    r = await client.post(f"/engines/{user}/admit", json={"auto_provision": True}, headers=pk(key))
    assert r.status_code == 200 and r.json()["admitted"], r.text
    engine: dict[str, object] = r.json()["engine"]
    return engine


async def test_killed_engine_is_restarted(make_app: AppFactory, settings: Settings, pg_dsn: str) -> None:
    async with make_app(health_max_failures=2, restart_backoff_base_s=0.05) as (app, client):
        _, key = await register_product(client)
        engine = await admit_new(client, key, "crashy")
        engine_id, url = str(engine["engine_id"]), str(engine["url"])
        worker = HealthWorker(lifecycle_of(app), app.state.settings)
        assert await worker.run_once() == 0
        os.kill(engine_pid(settings, engine_id), signal.SIGKILL)

        async def restarted() -> bool:
            await worker.run_once()
            await worker.wait_restarts()
            return "auto_restart_success" in await actions(pg_dsn, engine_id)

        await wait_until(restarted, timeout=30, interval=0.1)
        trail = await actions(pg_dsn, engine_id)
        assert trail.index("health_failed") < trail.index("auto_restart_start") < trail.index("auto_restart_success")
        assert await probe_health(url, 2)
        r = await client.get("/engines/crashy", headers=pk(key))
        assert r.json()["status"] == "running"
        assert (await client.delete("/engines/crashy", headers=pk(key))).status_code == 200


async def test_backoff_then_gave_up(make_app: AppFactory, settings: Settings, pg_dsn: str) -> None:
    command, flag = flaky_engine_command(settings.data_dir)
    base, cap, attempts = 0.2, 0.5, 3
    async with make_app(engine_command=command, health_max_failures=1, restart_backoff_base_s=base,
                        restart_backoff_max_s=cap, restart_max_attempts=attempts, boot_timeout_s=2) as (app, client):
        _, key = await register_product(client)
        engine = await admit_new(client, key, "doomed")
        engine_id = str(engine["engine_id"])
        flag.touch()  # from now on the engine never becomes healthy again
        os.kill(engine_pid(settings, engine_id), signal.SIGKILL)
        worker = HealthWorker(lifecycle_of(app), app.state.settings)

        async def gave_up() -> bool:
            await worker.run_once()
            await worker.wait_restarts()
            return "auto_restart_gave_up" in await actions(pg_dsn, engine_id)

        await wait_until(gave_up, timeout=60, interval=0.05)
        trail = await actions(pg_dsn, engine_id)
        assert trail.count("auto_restart_start") == attempts
        assert trail.count("auto_restart_failed") == attempts
        conn = await asyncpg.connect(pg_dsn)
        try:
            delays = [float(r["d"]) for r in await conn.fetch(
                "SELECT (metadata->>'next_in_s') AS d FROM audit_log WHERE engine_id = $1 "
                "AND action = 'auto_restart_failed' AND metadata ? 'next_in_s' ORDER BY id", engine_id)]
        finally:
            await conn.close()
        for n, delay in enumerate(delays, start=1):  # attempt n waits min(base·2ⁿ, cap) + ≤10 % jitter
            expected = min(base * 2**n, cap)
            assert expected - 0.01 <= delay <= expected * 1.1 + 0.01, (n, delay)
        r = await client.post("/engines/doomed/admit", headers=pk(key))
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_unhealthy"}
        # manual recovery: a start resets the counter and brings it back
        flag.unlink()
        r = await client.post("/engines/doomed/start", headers=pk(key))
        assert r.status_code == 200, r.text
        assert (await client.delete("/engines/doomed", headers=pk(key))).status_code == 200


def test_backoff_sequence() -> None:
    for n in range(10):
        d = backoff_s(n, 5, 300)
        assert min(5 * 2**n, 300) <= d <= min(5 * 2**n, 300) * 1.1


async def test_a_permanent_backend_error_gives_up_at_once(make_app: AppFactory, settings: Settings,
                                                          pg_dsn: str) -> None:
    """The engine program vanished (a bad command): one attempt, its reason audited, then gave up —
    no restart attempts burnt on an error that cannot heal by itself."""
    command, _ = flaky_engine_command(settings.data_dir)
    async with make_app(engine_command=command, health_max_failures=1, restart_backoff_base_s=0.05,
                        restart_max_attempts=5) as (app, client):
        _, key = await register_product(client)
        engine_id = str((await admit_new(client, key, "gone"))["engine_id"])
        os.unlink(command)
        os.kill(engine_pid(settings, engine_id), signal.SIGKILL)
        worker = HealthWorker(lifecycle_of(app), app.state.settings)

        async def gave_up() -> bool:
            await worker.run_once()
            await worker.wait_restarts()
            return "auto_restart_gave_up" in await actions(pg_dsn, engine_id)

        await wait_until(gave_up, timeout=30, interval=0.05)
        trail = await actions(pg_dsn, engine_id)
        assert trail.count("auto_restart_start") == 1 and trail.count("auto_restart_failed") == 1
        conn = await asyncpg.connect(pg_dsn)
        try:
            failed, gave = [await conn.fetchval(
                "SELECT metadata FROM audit_log WHERE engine_id = $1 AND action = $2", engine_id, action)
                for action in ("auto_restart_failed", "auto_restart_gave_up")]
        finally:
            await conn.close()
        assert "not found" in failed and "BACKEND_ERROR" in failed, failed
        assert "permanent backend error" in gave, gave
        assert (await client.get("/engines/gone", headers=pk(key))).json()["status"] == "failed"
        assert (await client.delete("/engines/gone", headers=pk(key))).status_code == 200
