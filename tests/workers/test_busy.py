"""Busy engines are not idle: a stream in flight keeps its engine awake, `idle_sleep: never` too.

Real engines (the subprocess backend running the reference engine, its deltas slowed through
ORCH_ENGINE_ENV_PASSTHROUGH) and real workers: the leader's own loops where the timing matters,
single passes (with a clock moved forward) where only the decision does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import httpx
import pytest

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.lifecycle import now
from bap_engine.registry import EngineRow
from bap_engine.workers.health import HealthWorker
from bap_engine.workers.idle import IdleWorker
from tests.conftest import pk, pool_of, register_product, wait_until
from tests.workers.conftest import AppFactory, engine_pid, lifecycle_of, process_state

DELAY_MS = 300
SLOW = {"engine_env_passthrough": "REFENGINE_DELTA_DELAY_MS"}


@pytest.fixture(autouse=True)
def _slow_deltas(monkeypatch: pytest.MonkeyPatch) -> None:
    """Engines pause DELAY_MS between deltas (passed through only where SLOW is in the settings)."""
    monkeypatch.setenv("REFENGINE_DELTA_DELAY_MS", str(DELAY_MS))


async def _admit(client: httpx.AsyncClient, key: str, user: str) -> dict[str, object]:
    r = await client.post(f"/engines/{user}/admit", json={"auto_provision": True}, headers=pk(key))
    assert r.status_code == 200 and r.json()["admitted"], r.text
    engine: dict[str, object] = r.json()["engine"]
    return engine


async def _row(pool: asyncpg.Pool, engine_id: object) -> EngineRow:
    async with pool.acquire() as conn:
        row = await registry.get_engine_by_id(conn, str(engine_id))
    assert row is not None
    return row


@contextlib.asynccontextmanager
async def _stream(engine: dict[str, object], words: int) -> AsyncIterator[AsyncIterator[str]]:
    """An /execute stream of `words` + 1 deltas (DELAY_MS apart), straight to the engine; yields its text
    chunks once the first event is in (the stream is then in flight)."""
    message = " ".join(f"w{i}" for i in range(words))
    async with httpx.AsyncClient(timeout=30) as c, c.stream(
            "POST", f"{engine['url']}/execute", json={"message": message},
            headers={"X-Engine-Key": str(engine["api_key"])}) as r:
        assert r.status_code == 200
        chunks = r.aiter_text()
        first = await anext(chunks)
        assert first.startswith("event: thread_lifecycle")
        yield chunks


async def test_a_long_stream_is_never_put_to_sleep(make_app: AppFactory, settings: Settings) -> None:
    """Idle limit 3 s, a 7.5 s stream: running throughout, without a gap; asleep a few seconds after it ends."""
    async with make_app(workers_enabled=True, idle_sleep_after_s=3, health_check_interval_s=1, **SLOW) as (app, client):
        _, key = await register_product(client)
        engine = await _admit(client, key, "streamer")
        pool = pool_of(app)
        statuses: set[str] = set()
        gaps: list[float] = []
        text: list[str] = []
        async with _stream(engine, words=24) as chunks:
            last = time.monotonic()
            async for chunk in chunks:
                t = time.monotonic()
                gaps.append(t - last)
                last = t
                text.append(chunk)
                statuses.add(str((await _row(pool, engine["engine_id"])).status))
        ended = time.monotonic()
        assert "event: done" in text[-1], text[-1]
        assert len(gaps) >= 24 and max(gaps) < 1.0, gaps  # a frozen engine would stall the stream
        assert statuses == {"running"}

        async def asleep() -> bool:
            return (await _row(pool, engine["engine_id"])).status == "sleeping"

        await wait_until(asleep, timeout=10, interval=0.1)
        slept_after = time.monotonic() - ended
        assert 1.5 <= slept_after <= 8, slept_after  # idle 3 s from the last busy probe (≤ 1 s before the end)
        assert process_state(engine_pid(settings, str(engine["engine_id"]))) == "T"
        sleep_row = await pool.fetchrow("SELECT metadata FROM audit_log WHERE engine_id = $1 AND action = 'sleep'",
                                        engine["engine_id"])
        assert sleep_row is not None and sleep_row["metadata"]["idle_s"] >= 3
        r = await client.post("/engines/streamer/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["engine"]["status"] == "running"
        assert (await client.delete("/engines/streamer", headers=pk(key))).status_code == 200


async def test_never_stays_awake_and_auto_sleeps_again(make_app: AppFactory) -> None:
    async with make_app(workers_enabled=True, idle_sleep_after_s=2, health_check_interval_s=1) as (app, client):
        _, key = await register_product(client)
        engine = await _admit(client, key, "owl")
        r = await client.patch("/engines/owl", json={"idle_sleep": "never"}, headers=pk(key))
        assert r.status_code == 200 and r.json()["idle_sleep"] == "never"
        pool = pool_of(app)
        await asyncio.sleep(4.5)  # more than twice the idle limit, several idle passes
        row = await _row(pool, engine["engine_id"])
        assert (row.status, row.idle_sleep) == ("running", "never")

        r = await client.patch("/engines/owl", json={"idle_sleep": "auto"}, headers=pk(key))
        assert r.status_code == 200 and r.json()["idle_sleep"] == "auto"

        async def asleep() -> bool:
            return (await _row(pool, engine["engine_id"])).status == "sleeping"

        await wait_until(asleep, timeout=5, interval=0.1)  # already idle long enough: at the next pass
        r = await client.get("/engines/owl", headers=pk(key))
        assert (r.json()["status"], r.json()["idle_sleep"]) == ("sleeping", "auto")
        # `never` on a sleeping engine: it stays asleep until admit wakes it, and then stays awake
        assert (await client.patch("/engines/owl", json={"idle_sleep": "never"}, headers=pk(key))).status_code == 200
        await asyncio.sleep(1.5)
        assert (await _row(pool, engine["engine_id"])).status == "sleeping"
        r = await client.post("/engines/owl/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["engine"]["status"] == "running"
        assert (await client.delete("/engines/owl", headers=pk(key))).status_code == 200


async def test_health_worker_records_busy_and_activity(make_app: AppFactory) -> None:
    async with make_app(**SLOW) as (app, client):
        _, key = await register_product(client)
        engine = await _admit(client, key, "worker-bee")
        await app.state.services.discovery.flush()
        pool, lc = pool_of(app), lifecycle_of(app)
        worker = HealthWorker(lc, app.state.settings)
        assert await worker.run_once() == 0
        before = await _row(pool, engine["engine_id"])
        assert before.busy is False and before.last_active_at is not None

        async with _stream(engine, words=10) as chunks:
            await worker.run_once()
            during = await _row(pool, engine["engine_id"])
            assert during.busy is True
            assert during.last_active_at is not None and during.last_active_at > before.last_active_at
            await asyncio.sleep(0.3)
            await worker.run_once()  # still busy: activity advances again
            again = await _row(pool, engine["engine_id"])
            assert again.busy is True and again.last_active_at is not None
            assert again.last_active_at > during.last_active_at
            rest = "".join([part async for part in chunks])
        assert "event: done" in rest

        await worker.run_once()
        after = await _row(pool, engine["engine_id"])
        assert after.busy is False and after.last_active_at == again.last_active_at  # idle from the last busy probe
        assert after.status == "running"
        assert (await client.delete("/engines/worker-bee", headers=pk(key))).status_code == 200


async def test_idle_worker_probes_before_it_sleeps(make_app: AppFactory) -> None:
    """A stream begun since the last health sweep (engines.busy still false): the idle worker's own probe
    sees it, records busy and activity, and leaves the engine awake."""
    async with make_app(**SLOW) as (app, client):
        _, key = await register_product(client)
        engine = await _admit(client, key, "late-starter")
        await app.state.services.discovery.flush()
        pool, lc = pool_of(app), lifecycle_of(app)
        later = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(hours=1))
        async with _stream(engine, words=6) as chunks:
            assert (await _row(pool, engine["engine_id"])).busy is False
            started: datetime = now()
            assert await later.run_once() == 0
            row = await _row(pool, engine["engine_id"])
            assert (row.status, row.busy) == ("running", True)
            assert row.last_active_at is not None and row.last_active_at >= started - timedelta(seconds=1)
            # the row says busy now: skipped without a probe, still awake
            assert await later.run_once() == 0
            rest = "".join([part async for part in chunks])
        assert "event: done" in rest
        assert (await _row(pool, engine["engine_id"])).status == "running"

        await HealthWorker(lc, app.state.settings).run_once()  # the stream ended: not busy any more
        assert (await _row(pool, engine["engine_id"])).busy is False
        assert await later.run_once() == 1
        assert (await _row(pool, engine["engine_id"])).status == "sleeping"
        r = await client.post("/engines/late-starter/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["engine"]["status"] == "running"
        assert (await client.delete("/engines/late-starter", headers=pk(key))).status_code == 200


async def test_idle_worker_spares_never_and_pool_engines(make_app: AppFactory) -> None:
    async with make_app() as (app, client):
        _, key = await register_product(client)
        owl = await _admit(client, key, "owl2")
        warm = await _admit(client, key, "warm")
        assert (await client.patch("/engines/owl2", json={"idle_sleep": "never"}, headers=pk(key))).status_code == 200
        pool, lc = pool_of(app), lifecycle_of(app)
        await pool.execute("UPDATE engines SET pool = true WHERE id = $1", warm["engine_id"])  # as a warm-pool engine
        later = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(hours=1))
        assert await later.run_once() == 0
        assert {(await _row(pool, e["engine_id"])).status for e in (owl, warm)} == {"running"}

        await pool.execute("UPDATE engines SET pool = false WHERE id = $1", warm["engine_id"])
        assert await later.run_once() == 1  # the other one, no longer in the pool
        assert (await _row(pool, warm["engine_id"])).status == "sleeping"
        assert (await _row(pool, owl["engine_id"])).status == "running"
        for user in ("owl2", "warm"):
            r = await client.post(f"/engines/{user}/admit", json={"auto_wake": True}, headers=pk(key))
            assert r.json()["engine"]["status"] == "running"
            assert (await client.delete(f"/engines/{user}", headers=pk(key))).status_code == 200
