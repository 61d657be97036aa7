"""PATCH /engines/{user_id} `{"idle_sleep": "auto" | "never"}`: answered as GET, audited, strict, no transition.

The PATCH answer carries the engine key (it is the GET object), which the recording `client` of
tests/conftest.py only allows on GET, provision, admit and rotate-key: PATCH calls go through an
unrecorded client on the same app; every other call through the recording one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import assert_envelope, client_for, pk, pool_of, register_product


@pytest.fixture
async def raw(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(app) as c:
        yield c


async def _audits(pool: asyncpg.Pool, engine_id: str) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        "SELECT user_id, actor, metadata, state FROM audit_log WHERE engine_id = $1 AND action = 'settings_update' "
        "ORDER BY id", engine_id))


async def _provision(client: httpx.AsyncClient, key: str, user: str) -> dict[str, object]:
    r = await client.post("/engines/provision", json={"user_id": user}, headers=pk(key))
    assert r.status_code == 200, r.text
    doc: dict[str, object] = r.json()
    return doc


async def test_patch_answers_as_get_and_is_audited(client: httpx.AsyncClient, raw: httpx.AsyncClient,
                                                   app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client)
    slug = (await pool_of(app).fetchval("SELECT slug FROM products WHERE id = $1", product_id))
    engine = await _provision(client, key, "tuned")
    engine_id = str(engine["engine_id"])
    got = (await client.get("/engines/tuned", headers=pk(key))).json()
    assert got["idle_sleep"] == "auto"

    r = await raw.patch("/engines/tuned", json={"idle_sleep": "never"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    after = (await client.get("/engines/tuned", headers=pk(key))).json()
    assert r.json() == after == {**got, "idle_sleep": "never"}
    assert after["api_key"] == engine["api_key"]

    rows = await _audits(pool_of(app), engine_id)
    assert [(a["user_id"], a["actor"], a["metadata"], a["state"]) for a in rows] == [
        ("tuned", slug, {"idle_sleep": {"from": "auto", "to": "never"}}, None)]

    # the same value again: 200, nothing changed, nothing audited
    r = await raw.patch("/engines/tuned", json={"idle_sleep": "never"}, headers=pk(key))
    assert r.status_code == 200 and r.json() == after
    assert len(await _audits(pool_of(app), engine_id)) == 1

    r = await raw.patch("/engines/tuned", json={"idle_sleep": "auto"}, headers=pk(key))
    assert r.status_code == 200 and r.json()["idle_sleep"] == "auto"
    rows = await _audits(pool_of(app), engine_id)
    assert [a["metadata"] for a in rows] == [{"idle_sleep": {"from": "auto", "to": "never"}},
                                             {"idle_sleep": {"from": "never", "to": "auto"}}]

    # admit shows it too
    assert (await raw.patch("/engines/tuned", json={"idle_sleep": "never"}, headers=pk(key))).status_code == 200
    r = await client.post("/engines/tuned/admit", headers=pk(key))
    assert r.json()["admitted"] is True and r.json()["engine"]["idle_sleep"] == "never"
    listed = (await client.get("/engines", headers=pk(key))).json()["engines"]
    assert [e["idle_sleep"] for e in listed] == ["never"]
    assert (await client.delete("/engines/tuned", headers=pk(key))).status_code == 200


async def test_patch_works_during_another_operation(client: httpx.AsyncClient, raw: httpx.AsyncClient,
                                                    app: FastAPI) -> None:
    _, key = await register_product(client)
    engine = await _provision(client, key, "mid-op")
    pool = pool_of(app)
    owner = app.state.services.lifecycle.owner_id
    await pool.execute("UPDATE engines SET op = 'test', op_owner = $2, op_deadline = now() + interval '1 hour' "
                       "WHERE id = $1", engine["engine_id"], owner)
    assert_envelope(await client.post("/engines/mid-op/stop", headers=pk(key)), 409, "ENGINE_BUSY")
    r = await raw.patch("/engines/mid-op", json={"idle_sleep": "never"}, headers=pk(key))
    assert r.status_code == 200 and r.json()["idle_sleep"] == "never" and r.json()["status"] == "running"
    row = await pool.fetchrow("SELECT op, status, idle_sleep FROM engines WHERE id = $1", engine["engine_id"])
    assert tuple(row) == ("test", "running", "never")  # the other op still holds the engine
    await pool.execute("UPDATE engines SET op = NULL, op_owner = NULL, op_deadline = NULL WHERE id = $1",
                       engine["engine_id"])
    assert (await client.delete("/engines/mid-op", headers=pk(key))).status_code == 200


BAD_BODIES = [
    b"", b"{}", b'{"idle_sleep": "sometimes"}', b'{"idle_sleep": "NEVER"}', b'{"idle_sleep": null}',
    b'{"idle_sleep": true}', b'{"idle_sleep": 1}', b'{"idle_sleep": "never", "busy": true}', b'{"other": 1}',
    b'["never"]', b'"never"', b"{bad",
]


async def test_patch_refuses_a_bad_body(client: httpx.AsyncClient, raw: httpx.AsyncClient, app: FastAPI) -> None:
    _, key = await register_product(client)
    engine = await _provision(client, key, "strict")
    headers = pk(key) | {"content-type": "application/json"}
    for body in BAD_BODIES:
        r = await raw.patch("/engines/strict", content=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert_envelope(r, 400, "VALIDATION_ERROR")
    assert await pool_of(app).fetchval("SELECT idle_sleep FROM engines WHERE id = $1", engine["engine_id"]) == "auto"
    assert await _audits(pool_of(app), str(engine["engine_id"])) == []
    assert (await client.delete("/engines/strict", headers=pk(key))).status_code == 200


async def test_patch_not_found_unauthorized_and_bad_user_id(client: httpx.AsyncClient, raw: httpx.AsyncClient,
                                                            app: FastAPI) -> None:
    _, key = await register_product(client)
    _, other_key = await register_product(client)
    engine = await _provision(client, key, "mine")
    never = {"idle_sleep": "never"}
    assert_envelope(await raw.patch("/engines/nobody", json=never, headers=pk(key)), 404, "ENGINE_NOT_FOUND")
    # another product's user does not exist for this one
    assert_envelope(await raw.patch("/engines/mine", json=never, headers=pk(other_key)), 404, "ENGINE_NOT_FOUND")
    for headers in ({}, pk("pk-sept-" + "0" * 64), pk("")):
        assert_envelope(await raw.patch("/engines/mine", json=never, headers=headers), 401, "INVALID_PLATFORM_KEY")
        # the key is checked before the body
        assert_envelope(await raw.patch("/engines/mine", json={"x": 1}, headers=headers), 401, "INVALID_PLATFORM_KEY")
    assert_envelope(await raw.patch("/engines/-bad", json=never, headers=pk(key)), 400, "VALIDATION_ERROR")
    assert await pool_of(app).fetchval("SELECT idle_sleep FROM engines WHERE id = $1", engine["engine_id"]) == "auto"
    assert await _audits(pool_of(app), str(engine["engine_id"])) == []
    assert (await client.delete("/engines/mine", headers=pk(key))).status_code == 200
