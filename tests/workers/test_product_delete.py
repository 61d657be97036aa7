"""A product delete interrupted after its mark (the process killed before its engines were gone) is
finished by the reconciler: the remaining engines destroyed through the lifecycle (each audited), then
the product row. A delete some live process still carries out is left to it."""

from __future__ import annotations

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.errors import BapError
from bap_engine.workers.pool import PoolWorker
from bap_engine.workers.reconcile import ReconcileWorker
from tests.conftest import ADMIN_KEY, assert_envelope, engine_dir, pk, pool_of, register_product, wait_until
from tests.workers.conftest import AppFactory, alive, engine_pid, lifecycle_of

ADMIN = {"X-Admin-Key": ADMIN_KEY}
DEAD_OWNER = 2**31 - 11  # no process holds this owner lock


async def _mark(app: FastAPI, product_id: str, owner: int | None, ttl_s: float = 3600) -> None:
    """What DELETE does first, and all a process killed right after it leaves behind."""
    async with pool_of(app).acquire() as conn, conn.transaction():
        marked = await registry.mark_product_deleted(conn, product_id, owner, ttl_s)
    assert marked is not None and marked[1] is True


async def _audit(pool: asyncpg.Pool, product_id: str, action: str) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT engine_id::text AS engine_id, actor, metadata FROM audit_log "
                                 "WHERE product_id = $1 AND action = $2 ORDER BY id", product_id, action))


async def _product_with_engines(app: FastAPI, client: httpx.AsyncClient,
                                settings: Settings) -> tuple[str, str, list[str]]:
    """A product with a warm pool of one and one user engine: (product id, key, engine ids)."""
    product_id, key = await register_product(client, {"warm_pool": 1})
    r = await client.post("/engines/alice/admit", json={"auto_provision": True}, headers=pk(key))
    assert r.status_code == 200 and r.json()["admitted"], r.text
    assert await PoolWorker(lifecycle_of(app), settings).run_once() == 1
    rows = await pool_of(app).fetch("SELECT id::text AS id FROM engines WHERE product_id = $1", product_id)
    assert len(rows) == 2
    return product_id, key, [r["id"] for r in rows]


async def test_an_interrupted_delete_is_finished_by_the_reconciler(make_app: AppFactory, settings: Settings) -> None:
    async with make_app() as (app, client):
        pool, lc = pool_of(app), lifecycle_of(app)
        product_id, key, engine_ids = await _product_with_engines(app, client, settings)
        pids = [engine_pid(settings, e) for e in engine_ids]
        r = await client.put(f"/products/{product_id}/webhook", json={"url": "https://example.invalid/h"},
                             headers=ADMIN)
        assert r.status_code == 200, r.text
        await _mark(app, product_id, DEAD_OWNER)

        # marked: its key works nowhere, it is not found, and its pool is not refilled
        assert_envelope(await client.post("/engines/alice/admit", json={}, headers=pk(key)), 401,
                        "INVALID_PLATFORM_KEY")
        assert_envelope(await client.get("/status", headers=pk(key)), 401, "INVALID_PLATFORM_KEY")
        assert_envelope(await client.get(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
        async with pool.acquire() as conn:
            assert product_id not in {p.id for p in await registry.products_with_pool(conn)}
        assert all(alive(p) for p in pids)  # nothing destroyed yet: the process "died" after the mark

        worker = ReconcileWorker(lc, settings)
        assert await worker.run_once() == 2
        await wait_until(lambda: not any(alive(p) for p in pids), 5)
        assert not any(engine_dir(settings, e).exists() for e in engine_ids)
        assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
        assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0
        assert await pool.fetchval("SELECT count(*) FROM webhooks WHERE product_id = $1", product_id) == 0
        destroys = await _audit(pool, product_id, "destroy")
        assert sorted(d["engine_id"] for d in destroys) == sorted(engine_ids)
        assert {d["actor"] for d in destroys} == {"system"}
        done = [r["metadata"]["done"] for r in await _audit(pool, product_id, "reconcile")]
        assert sorted(done) == ["destroy completed", "destroy completed", "product removed"]
        assert await worker.run_once() == 0  # idempotent
        assert_envelope(await client.delete(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")


@pytest.mark.parametrize("ends", ["released", "past its deadline"])
async def test_a_delete_a_live_process_carries_out_is_left_to_it(make_app: AppFactory, settings: Settings,
                                                                 ends: str) -> None:
    async with make_app() as (app, client):
        pool, lc = pool_of(app), lifecycle_of(app)
        product_id, _key, engine_ids = await _product_with_engines(app, client, settings)
        await _mark(app, product_id, lc.owner_id, 3600 if ends == "released" else 1)  # this process, alive
        worker = ReconcileWorker(lc, settings)
        assert await worker.run_once() == 0
        assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 2
        if ends == "released":  # given up (as a DELETE that answered 503 does): the reconciler's
            async with pool.acquire() as conn:
                await registry.release_product_delete(conn, product_id, lc.owner_id)
        else:  # a delete hung past its deadline
            await wait_until(lambda: _past_deadline(pool, product_id), 5)
        assert await worker.run_once() == 2
        assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0
        assert all(not engine_dir(settings, e).exists() for e in engine_ids)


async def test_no_engine_is_born_after_the_mark(make_app: AppFactory, settings: Settings) -> None:
    """A provision that authenticated just before the delete started inserts nothing once it is marked."""
    async with make_app() as (app, client):
        pool, lc = pool_of(app), lifecycle_of(app)
        product_id, _key = await register_product(client)
        async with pool.acquire() as conn:
            product = await registry.get_product(conn, product_id)  # what the request authenticated
        assert product is not None
        await _mark(app, product_id, None)
        with pytest.raises(BapError):
            await lc.provision(product, "late", actor=product.slug)
        assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
        assert not (settings.data_dir / "engines").exists() or not any((settings.data_dir / "engines").iterdir())
        assert await ReconcileWorker(lc, settings).run_once() == 0  # no engine: the row just goes
        assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0


async def _past_deadline(pool: asyncpg.Pool, product_id: str) -> bool:
    return await pool.fetchval("SELECT delete_deadline < now() FROM products WHERE id = $1", product_id) is True
