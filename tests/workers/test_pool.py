"""Warm pool: filled by its worker, claimed without a boot, never handed to two users, hidden from
the product's listings, counted in max_engines, shrunk with the policy, and crash-safe."""

from __future__ import annotations

import asyncio
import os
import shlex
import signal
import sys

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.registry import EngineRow
from bap_engine.workers.pool import PoolWorker
from bap_engine.workers.reconcile import ReconcileWorker
from tests.conftest import ADMIN_KEY, assert_envelope, pk, pool_of, register_product, wait_until
from tests.workers.conftest import AppFactory, alive, engine_pid, lifecycle_of

ADMIN = {"X-Admin-Key": ADMIN_KEY}


async def _pool_rows(app: FastAPI, product_id: str) -> list[EngineRow]:
    async with pool_of(app).acquire() as conn:
        rows = await registry.pool_engines(conn, app.state.settings.deployment)
    return [r for r in rows if r.product_id == product_id]


async def _execute(engine_url: str, key: str) -> int:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{engine_url}/history", headers={"X-Engine-Key": key})
        return r.status_code


async def _audit(dsn: str, product_id: str, action: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch("SELECT user_id, engine_id::text AS engine_id, state, actor FROM audit_log "
                                "WHERE product_id = $1 AND action = $2 ORDER BY id", product_id, action)
    finally:
        await conn.close()


async def test_pool_is_filled_hidden_and_claimed_without_a_boot(make_app: AppFactory, pg_dsn: str) -> None:
    other = shlex.join((sys.executable, "-m", "bap_engine.refengine"))  # a second known version, "other"
    async with make_app(engine_commands={"other": other}) as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 2})
        worker = PoolWorker(lc, app.state.settings)
        assert await worker.run_once() == 2
        pool = await _pool_rows(app, product_id)
        assert len(pool) == 2 and all(r.status == "running" for r in pool)
        pool_keys = {r.id: lc.key_of(r) for r in pool}
        fills = await _audit(pg_dsn, product_id, "pool_fill")
        assert len(fills) == 2 and all(f["user_id"] is None and f["state"] == "running" for f in fills)

        # hidden from the product's listings, counted in warm
        assert (await client.get("/engines", headers=pk(key))).json() == {"engines": [], "total": 0}
        status = (await client.get("/status", headers=pk(key))).json()
        assert status["total"] == 0 and sum(status["by_status"].values()) == 0 and status["warm"] == 2
        assert await worker.run_once() == 0  # full: nothing to do

        r = await client.post("/engines/alice/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        assert r.json()["admitted"] and engine["engine_id"] in pool_keys and engine["user_id"] == "alice"
        assert await _execute(engine["url"], engine["api_key"]) == 200
        assert await _execute(engine["url"], pool_keys[engine["engine_id"]]) == 401  # overlap 0
        claims = await _audit(pg_dsn, product_id, "pool_claim")
        assert [(c["user_id"], c["engine_id"], c["state"]) for c in claims] == [
            ("alice", engine["engine_id"], "running")]
        assert claims[0]["actor"].startswith("p-")  # the product's slug
        listed = (await client.get("/engines", headers=pk(key))).json()
        assert [e["user_id"] for e in listed["engines"]] == ["alice"] and listed["total"] == 1
        assert (await client.get("/status", headers=pk(key))).json()["warm"] == 1

        # provision claims too; the worker refills
        r = await client.post("/engines/provision", json={"user_id": "bob"}, headers=pk(key))
        assert r.status_code == 200 and r.json()["engine_id"] in pool_keys
        assert (await client.get("/status", headers=pk(key))).json()["warm"] == 0
        assert await worker.run_once() == 2
        assert (await client.get("/status", headers=pk(key))).json()["warm"] == 2
        # a version the pool does not hold boots normally
        r = await client.post("/engines/provision", json={"user_id": "carol", "engine_version": "other"},
                              headers=pk(key))
        assert r.status_code == 200 and r.json()["engine_id"] not in {p.id for p in await _pool_rows(app,
                                                                                                      product_id)}


async def test_concurrent_claims_never_share_an_engine(make_app: AppFactory, pg_dsn: str) -> None:
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 3})
        await PoolWorker(lc, app.state.settings).run_once()
        pool_ids = {r.id for r in await _pool_rows(app, product_id)}
        users = [f"u{i}" for i in range(5)]
        answers = await asyncio.gather(*(client.post(f"/engines/{u}/admit", json={"auto_provision": True},
                                                     headers=pk(key)) for u in users))
        ids = [a.json()["engine"]["engine_id"] for a in answers]
        assert len(set(ids)) == 5  # five users, five engines
        assert len(set(ids) & pool_ids) == 3  # the three warm ones went to three users; two booted
        conn = await asyncpg.connect(pg_dsn)
        try:
            bound = await conn.fetch("SELECT id::text AS id, user_id FROM engines WHERE product_id = $1", product_id)
        finally:
            await conn.close()
        assert sorted(r["user_id"] for r in bound) == users


async def test_twenty_new_users_and_a_pool_of_five(make_app: AppFactory) -> None:
    """20 concurrent new users with a pool of 5: 20 engines, the 5 warm ones claimed, none shared."""
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 5})
        assert await PoolWorker(lc, app.state.settings).run_once() == 5
        pool_ids = {r.id for r in await _pool_rows(app, product_id)}
        users = [f"new{i:02d}" for i in range(20)]
        answers = await asyncio.gather(*(client.post(f"/engines/{u}/admit", json={"auto_provision": True},
                                                     headers=pk(key)) for u in users))
        engines = {u: a.json()["engine"] for u, a in zip(users, answers, strict=True)}
        assert all(a.json()["admitted"] for a in answers)
        ids = [e["engine_id"] for e in engines.values()]
        assert len(set(ids)) == 20 and set(ids) & pool_ids == pool_ids  # the 5 warm ones, each to one user
        async with pool_of(app).acquire() as conn:
            rows = await conn.fetch("SELECT user_id, pool FROM engines WHERE product_id = $1", product_id)
            claims = await conn.fetch("SELECT user_id, engine_id::text AS e FROM audit_log WHERE product_id = $1 "
                                      "AND action = 'pool_claim'", product_id)
        assert sorted(r["user_id"] for r in rows) == users and not any(r["pool"] for r in rows)
        assert len(claims) == 5 and {c["e"] for c in claims} == pool_ids
        assert len({c["user_id"] for c in claims}) == 5
        for user in users:  # each user's own key works on its engine
            assert await _execute(engines[user]["url"], engines[user]["api_key"]) == 200


async def test_max_engines_counts_the_pool_and_shrinking_destroys(make_app: AppFactory, pg_dsn: str) -> None:
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 3, "max_engines": 3})
        worker = PoolWorker(lc, app.state.settings)
        assert await worker.run_once() == 3
        for user in ("a", "b"):
            assert (await client.post(f"/engines/{user}/admit", json={"auto_provision": True},
                                      headers=pk(key))).json()["admitted"]
        assert await worker.run_once() == 0  # 2 users + 1 warm = max_engines
        assert (await client.post("/engines/c/admit", json={"auto_provision": True}, headers=pk(key))).json()[
            "admitted"]  # the last warm one
        r = await client.post("/engines/provision", json={"user_id": "d"}, headers=pk(key))
        assert_envelope(r, 429, "QUOTA_EXCEEDED")

        r = await client.put(f"/products/{product_id}/policy", json={"policy": {"warm_pool": 3}}, headers=ADMIN)
        assert r.status_code == 200
        assert await worker.run_once() == 3
        r = await client.put(f"/products/{product_id}/policy", json={"policy": {"warm_pool": 1}}, headers=ADMIN)
        assert await worker.run_once() == 2
        assert len(await _pool_rows(app, product_id)) == 1
        r = await client.put(f"/products/{product_id}/policy", json={"policy": {"warm_pool": 0}}, headers=ADMIN)
        assert await worker.run_once() == 1
        assert await _pool_rows(app, product_id) == []
        destroys = await _audit(pg_dsn, product_id, "destroy")
        assert len(destroys) == 3 and all(d["user_id"] is None for d in destroys)
        assert len((await client.get("/engines", headers=pk(key))).json()["engines"]) == 3  # users untouched


async def test_dead_pool_engine_is_replaced(make_app: AppFactory, settings: Settings, pg_dsn: str) -> None:
    async with make_app(restart_backoff_base_s=600) as (app, client):
        lc = lifecycle_of(app)
        product_id, _ = await register_product(client, {"warm_pool": 1})
        worker = PoolWorker(lc, app.state.settings)
        await worker.run_once()
        [row] = await _pool_rows(app, product_id)
        pid = engine_pid(settings, row.id)
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not alive(pid), 5)
        await ReconcileWorker(lc, app.state.settings).run_once()  # marks it failed
        assert (await _pool_rows(app, product_id))[0].status == "failed"
        assert await worker.run_once() == 2  # destroyed, and a new one booted
        [fresh] = await _pool_rows(app, product_id)
        assert fresh.id != row.id and fresh.status == "running"


@pytest.mark.parametrize("engine_alive", [True, False])
async def test_crash_mid_claim_is_finished_or_undone(make_app: AppFactory, settings: Settings, pg_dsn: str,
                                                     engine_alive: bool) -> None:
    """A claim committed (the engine bound, the user's key pending) by a process that then died."""
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 1})
        await PoolWorker(lc, app.state.settings).run_once()
        [row] = await _pool_rows(app, product_id)
        pool_key = lc.key_of(row)
        user_key = "sk-sept-" + os.urandom(32).hex()
        dead_owner = 2**31 - 11
        async with pool_of(app).acquire() as conn:
            bound = await registry.claim_pool_engine(conn, product_id, settings.deployment, "zoe",
                                                     row.engine_version, lc.sealer.seal(user_key), dead_owner,
                                                     "pool_claim", -1)
        assert bound is not None and bound.id == row.id
        if not engine_alive:
            pid = engine_pid(settings, row.id)
            os.kill(pid, signal.SIGKILL)
            await wait_until(lambda: not alive(pid), 5)
        await ReconcileWorker(lc, app.state.settings).run_once()
        r = await client.get("/engines/zoe", headers=pk(key))
        if engine_alive:
            doc = r.json()
            assert doc["engine_id"] == row.id and doc["api_key"] == user_key and doc["status"] == "running"
            assert await _execute(str(doc["url"]), user_key) == 200
            assert await _execute(str(doc["url"]), pool_key) == 401
            assert [c["user_id"] for c in await _audit(pg_dsn, product_id, "pool_claim")] == ["zoe"]
        else:
            assert_envelope(r, 404, "ENGINE_NOT_FOUND")
            assert (await lc.backend.inspect(row.id)).state == "absent"
        assert await _pool_rows(app, product_id) == []


async def test_prometheus_shows_the_pool(make_app: AppFactory) -> None:
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        product_id, key = await register_product(client, {"warm_pool": 2})
        await PoolWorker(lc, app.state.settings).run_once()
        assert (await client.post("/engines/u/admit", json={"auto_provision": True}, headers=pk(key))).json()[
            "admitted"]
        slug = (await client.get(f"/products/{product_id}", headers=ADMIN)).json()["slug"]
        text = (await client.get("/metrics/prometheus", headers={"Authorization": f"Bearer {ADMIN_KEY}"})).text
        assert f'bap_engines_warm{{product="{slug}",state="running"}} 1.0' in text
        assert f'bap_pool_fills_total{{product="{slug}"}} 2.0' in text
        assert f'bap_pool_claims_total{{product="{slug}"}} 1.0' in text
        assert f'bap_engines{{product="{slug}",state="running"}} 1.0' in text  # the user's engine only
