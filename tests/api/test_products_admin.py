"""Products as the operator manages them (X-Admin-Key): GET /products/{product_id}, DELETE of a product
with its engines and warm pool, and platform-key rotation with an overlap that every replica sees
(it lives in Postgres)."""

from __future__ import annotations

import asyncio
import time
import uuid

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle
from bap_engine.workers.pool import PoolWorker
from tests.conftest import (
    ADMIN_KEY,
    ResponseLog,
    assert_envelope,
    engine_dir,
    open_app,
    pk,
    pool_of,
    register_product,
    services_of,
    wait_until,
)
from tests.workers.conftest import alive, engine_pid

ADMIN = {"X-Admin-Key": ADMIN_KEY}


def _lifecycle(app: FastAPI) -> Lifecycle:
    return services_of(app).lifecycle


async def _audit(pool: asyncpg.Pool, product_id: str, action: str) -> list[asyncpg.Record]:
    return list(await pool.fetch("SELECT user_id, engine_id::text AS engine_id, actor, metadata FROM audit_log "
                                 "WHERE product_id = $1 AND action = $2 ORDER BY id", product_id, action))


async def _works(client: httpx.AsyncClient, key: str) -> bool:
    """The key authenticates, through admit (the hot path's one lookup) and through another route; both
    agree, or the test fails."""
    admit = await client.post("/engines/nobody/admit", json={}, headers=pk(key))
    status = await client.get("/status", headers=pk(key))
    assert admit.status_code in (200, 401) and status.status_code in (200, 401), (admit.text, status.text)
    if admit.status_code == 401:
        assert_envelope(admit, 401, "INVALID_PLATFORM_KEY")
    if status.status_code == 401:
        assert_envelope(status, 401, "INVALID_PLATFORM_KEY")
    assert admit.status_code == status.status_code, (admit.status_code, status.status_code)
    return admit.status_code == 200


async def _rotate(client: httpx.AsyncClient, product_id: str, body: object = None) -> str:
    r = await client.post(f"/products/{product_id}/rotate-platform-key", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == {"product_id", "platform_api_key"} and doc["product_id"] == product_id, doc
    key = doc["platform_api_key"]
    assert isinstance(key, str) and key.startswith("pk-sept-") and len(key) > 40
    return key


# ---- GET /products/{product_id} ---------------------------------------------------------------
async def test_get_product(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client, {"max_engines": 3})
    r = await client.get(f"/products/{product_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == {"product_id", "slug", "display_name", "policy", "created_at", "engines"}
    assert doc["product_id"] == product_id and doc["slug"].startswith("p-") and doc["display_name"] == "Test product"
    assert doc["policy"] == {"max_engines": 3} and doc["engines"] == 0
    assert doc["created_at"].endswith("Z")
    listed = (await client.get("/products", headers=ADMIN)).json()["products"]
    assert [p["created_at"] for p in listed if p["product_id"] == product_id] == [doc["created_at"]]

    r = await client.post("/engines/provision", json={"user_id": "alice"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert (await client.get(f"/products/{product_id}", headers=ADMIN)).json()["engines"] == 1
    assert (await client.delete("/engines/alice", headers=pk(key))).status_code == 200
    assert (await client.get(f"/products/{product_id}", headers=ADMIN)).json()["engines"] == 0


@pytest.mark.parametrize("product_id", [str(uuid.uuid4()), "not-a-uuid", "register", "12345"])
async def test_unknown_products_are_404(client: httpx.AsyncClient, product_id: str) -> None:
    assert_envelope(await client.get(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    assert_envelope(await client.delete(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    assert_envelope(await client.post(f"/products/{product_id}/rotate-platform-key", headers=ADMIN), 404,
                    "PRODUCT_NOT_FOUND")


async def test_product_routes_need_the_admin_key(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key = await register_product(client)
    for headers in ({}, pk(key), {"X-Admin-Key": key}, {"X-Admin-Key": ADMIN_KEY + "x"}):
        assert_envelope(await client.get(f"/products/{product_id}", headers=headers), 401, "INVALID_ADMIN_KEY")
        assert_envelope(await client.delete(f"/products/{product_id}", headers=headers), 401, "INVALID_ADMIN_KEY")
        assert_envelope(await client.post(f"/products/{product_id}/rotate-platform-key", headers=headers), 401,
                        "INVALID_ADMIN_KEY")
    assert await _works(client, key)
    assert (await client.get(f"/products/{product_id}", headers=ADMIN)).status_code == 200


# ---- DELETE /products/{product_id} ------------------------------------------------------------
async def test_delete_removes_engines_pool_webhook_and_key(client: httpx.AsyncClient, app: FastAPI,
                                                          settings: Settings) -> None:
    lc, pool = _lifecycle(app), pool_of(app)
    product_id, key = await register_product(client, {"warm_pool": 1})
    worker = PoolWorker(lc, settings)
    assert await worker.run_once() == 1
    for user in ("alice", "bob"):  # alice takes the warm engine, bob boots one
        r = await client.post(f"/engines/{user}/admit", json={"auto_provision": True}, headers=pk(key))
        assert r.status_code == 200 and r.json()["admitted"], r.text
    assert await worker.run_once() == 1  # refilled
    r = await client.put(f"/products/{product_id}/webhook", json={"url": "https://example.invalid/hook"},
                         headers=ADMIN)
    assert r.status_code == 200, r.text
    rows = await pool.fetch("SELECT id::text AS id, pool FROM engines WHERE product_id = $1", product_id)
    assert sorted(r["pool"] for r in rows) == [False, False, True]
    engine_ids = [r["id"] for r in rows]
    pids = [engine_pid(settings, e) for e in engine_ids]
    assert all(alive(p) for p in pids)
    assert (await client.get(f"/products/{product_id}", headers=ADMIN)).json()["engines"] == 3

    r = await client.delete(f"/products/{product_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "deleted", "product_id": product_id, "engines_destroyed": 3}

    # the key is refused at once, everywhere
    assert not await _works(client, key)
    assert_envelope(await client.get("/engines/alice", headers=pk(key)), 401, "INVALID_PLATFORM_KEY")
    assert_envelope(await client.post("/engines/provision", json={"user_id": "carol"}, headers=pk(key)), 401,
                    "INVALID_PLATFORM_KEY")
    # engines, processes, data, rows, webhook and product: gone
    await wait_until(lambda: not any(alive(p) for p in pids), 5)
    assert not any(engine_dir(settings, e).exists() for e in engine_ids)
    assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0
    assert await pool.fetchval("SELECT count(*) FROM webhooks WHERE product_id = $1", product_id) == 0
    assert_envelope(await client.get(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    assert_envelope(await client.delete(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    listed = (await client.get("/products", headers=ADMIN)).json()["products"]
    assert product_id not in {p["product_id"] for p in listed}
    # the audit trail stays: the delete, and each engine's destroy
    deletes = await _audit(pool, product_id, "product_delete")
    assert len(deletes) == 1 and deletes[0]["actor"] == "admin" and deletes[0]["metadata"]["engines"] == 3
    destroys = await _audit(pool, product_id, "destroy")
    assert sorted(d["engine_id"] for d in destroys) == sorted(engine_ids)
    assert {d["actor"] for d in destroys} == {"admin"}
    assert sorted(d["user_id"] or "" for d in destroys) == ["", "alice", "bob"]  # the pool engine names no user
    # nor is its pool refilled
    assert await worker.run_once() == 0
    assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0


async def test_delete_waits_for_a_busy_engine(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    lc, pool = _lifecycle(app), pool_of(app)
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "alice"}, headers=pk(key))
    engine_id = r.json()["engine_id"]
    pid = engine_pid(settings, engine_id)
    claim = await lc.tx.claim(engine_id, "stop")  # another operation holds the engine
    assert claim is not None
    deleting = asyncio.create_task(client.delete(f"/products/{product_id}", headers=ADMIN))
    await wait_until(lambda: _deleted_at(pool, product_id), 5)
    assert not await _works(client, key)  # refused from the moment the delete starts
    assert_envelope(await client.get(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    await asyncio.sleep(0.5)
    assert not deleting.done() and alive(pid)
    await claim.release()
    r = await deleting
    assert r.status_code == 200 and r.json()["engines_destroyed"] == 1, r.text
    await wait_until(lambda: not alive(pid), 5)
    assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0


async def _deleted_at(pool: asyncpg.Pool, product_id: str) -> bool:
    return await pool.fetchval("SELECT deleted_at IS NOT NULL FROM products WHERE id = $1", product_id) is True


async def test_delete_answers_503_while_engines_are_left_and_a_retry_finishes(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    pool = pool_of(app)
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "alice"}, headers=pk(key))
    assert r.status_code == 200, r.text
    other = str(uuid.uuid4())  # an engine another deployment runs: this one cannot destroy it
    await pool.execute(
        "INSERT INTO engines (id, product_id, user_id, status, engine_version, api_key_hash, engine_key_enc, "
        "deployment) VALUES ($1, $2, 'elsewhere', 'stopped', 'v', 'h', 'x', $3)", other, product_id,
        f"other-{uuid.uuid4().hex[:8]}")
    started = time.monotonic()
    r = await client.delete(f"/products/{product_id}", headers=ADMIN)
    assert time.monotonic() - started < settings.boot_timeout_s  # nothing busy here: no wait
    assert_envelope(r, 503, "SERVICE_UNAVAILABLE")
    assert "1 of its engines" in r.json()["error"]["message"]
    assert not await _works(client, key)  # the product stays deleted
    assert_envelope(await client.get(f"/products/{product_id}", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    assert await pool.fetchval("SELECT delete_owner FROM products WHERE id = $1", product_id) is None  # reconciler's
    assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 1

    await pool.execute("DELETE FROM engines WHERE id = $1", other)  # that deployment destroyed it
    r = await client.delete(f"/products/{product_id}", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "deleted", "product_id": product_id, "engines_destroyed": 0}
    assert await pool.fetchval("SELECT count(*) FROM products WHERE id = $1", product_id) == 0
    assert len(await _audit(pool, product_id, "product_delete")) == 1  # the retry wrote no second intent


# ---- POST /products/{product_id}/rotate-platform-key -------------------------------------------
async def test_rotation_with_an_overlap_on_two_replicas(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, response_log: ResponseLog
) -> None:
    product_id, old = await register_product(client)
    async with open_app(settings, response_log) as (_, other):
        new = await _rotate(client, product_id, {"overlap_seconds": 2})
        rotated = time.monotonic()
        assert new != old
        for c in (client, other):
            assert await _works(c, old) and await _works(c, new)
        rows = await _audit(pool_of(app), product_id, "platform_key_rotate")
        assert [(r["actor"], r["metadata"]) for r in rows] == [("admin", {"overlap_seconds": 2})]
        await asyncio.sleep(max(0.0, 2.2 - (time.monotonic() - rotated)))
        for c in (other, client):
            assert not await _works(c, old), "the old key outlived its overlap"
            assert await _works(c, new)


async def test_rotation_without_overlap_refuses_the_old_key_at_once(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, response_log: ResponseLog
) -> None:
    product_id, old = await register_product(client)
    async with open_app(settings, response_log) as (_, other):
        assert await _works(other, old)
        new = await _rotate(client, product_id)  # no body: overlap 0
        for c in (client, other):
            assert not await _works(c, old) and await _works(c, new)
        newer = await _rotate(other, product_id, {})  # {}: the defaults too
        for c in (client, other):
            assert not await _works(c, new) and await _works(c, newer)
    rows = await _audit(pool_of(app), product_id, "platform_key_rotate")
    assert [r["metadata"] for r in rows] == [{"overlap_seconds": 0}] * 2


async def test_a_second_rotation_drops_the_oldest_key(client: httpx.AsyncClient) -> None:
    product_id, k1 = await register_product(client)
    k2 = await _rotate(client, product_id, {"overlap_seconds": 600})
    k3 = await _rotate(client, product_id, {"overlap_seconds": 600})
    assert not await _works(client, k1)
    assert await _works(client, k2) and await _works(client, k3)
    k4 = await _rotate(client, product_id, {"overlap_seconds": 0})
    assert not await _works(client, k2) and not await _works(client, k3) and await _works(client, k4)


async def test_the_rotated_key_drives_the_whole_api(client: httpx.AsyncClient) -> None:
    product_id, old = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "alice"}, headers=pk(old))
    assert r.status_code == 200, r.text
    new = await _rotate(client, product_id, {"overlap_seconds": 0})
    r = await client.post("/engines/alice/admit", json={}, headers=pk(new))
    assert r.status_code == 200 and r.json()["admitted"], r.text
    assert (await client.get("/engines/alice", headers=pk(new))).status_code == 200
    assert_envelope(await client.get("/engines/alice", headers=pk(old)), 401, "INVALID_PLATFORM_KEY")
    assert (await client.delete("/engines/alice", headers=pk(new))).status_code == 200


@pytest.mark.parametrize("body", [
    {"overlap_seconds": -1}, {"overlap_seconds": 86_401}, {"overlap_seconds": "5"}, {"overlap_seconds": 1.5},
    {"overlap_seconds": True}, {"overlap_seconds": None}, {"overlap": 5}, {"overlap_seconds": 5, "extra": 1},
    [], "5", 5,
])
async def test_bad_rotation_bodies_are_400(client: httpx.AsyncClient, body: object) -> None:
    product_id, key = await register_product(client)
    r = await client.post(f"/products/{product_id}/rotate-platform-key", json=body, headers=ADMIN)
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert await _works(client, key)  # nothing rotated
    assert await pool_fetch_audit_count(client, product_id) == 0


async def test_an_integral_float_overlap_is_an_integer(client: httpx.AsyncClient) -> None:
    """JSON's 300.0 is the schema's integer 300 (as in a policy); 1.5 stays a 400."""
    product_id, old = await register_product(client)
    new = await _rotate(client, product_id, {"overlap_seconds": 300.0})
    assert await _works(client, old) and await _works(client, new)


async def test_malformed_rotation_bodies_are_400(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client)
    for content, ctype in ((b"{not json", "application/json"), (b'{"overlap_seconds": 5}', "text/plain")):
        r = await client.post(f"/products/{product_id}/rotate-platform-key", content=content,
                              headers={**ADMIN, "content-type": ctype})
        assert_envelope(r, 400, "VALIDATION_ERROR")
    assert await _works(client, key)


async def test_the_largest_overlap_is_accepted(client: httpx.AsyncClient) -> None:
    product_id, old = await register_product(client)
    new = await _rotate(client, product_id, {"overlap_seconds": 86_400})
    assert await _works(client, old) and await _works(client, new)


async def test_a_deleted_product_cannot_rotate(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client)
    assert (await client.delete(f"/products/{product_id}", headers=ADMIN)).status_code == 200
    assert_envelope(await client.post(f"/products/{product_id}/rotate-platform-key", headers=ADMIN), 404,
                    "PRODUCT_NOT_FOUND")
    assert_envelope(await client.put(f"/products/{product_id}/policy", json={"policy": {}}, headers=ADMIN), 404,
                    "PRODUCT_NOT_FOUND")


async def pool_fetch_audit_count(client: httpx.AsyncClient, product_id: str) -> int:
    r = await client.get(f"/products/{product_id}/audit", params={"action": "platform_key_rotate"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return len(r.json()["events"])


async def test_an_empty_body_or_null_is_the_defaults(client: httpx.AsyncClient) -> None:
    product_id, k1 = await register_product(client)
    r = await client.post(f"/products/{product_id}/rotate-platform-key", content=b"null",
                          headers={**ADMIN, "content-type": "application/json"})
    assert r.status_code == 200, r.text
    k2 = r.json()["platform_api_key"]
    r = await client.post(f"/products/{product_id}/rotate-platform-key", content=b"", headers=ADMIN)
    assert r.status_code == 200, r.text
    k3 = r.json()["platform_api_key"]
    assert not await _works(client, k1) and not await _works(client, k2) and await _works(client, k3)
