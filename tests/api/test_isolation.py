"""Tenant isolation: another product's engine does not exist for the caller, on every route."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import assert_envelope, pk, pool_of, register_product


async def test_product_b_cannot_see_or_touch_product_a_engine(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    a_id, a_key = await register_product(client)
    b_id, b_key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "shared-name"}, headers=pk(a_key))
    assert r.status_code == 200
    a_engine = r.json()

    for method, path in (("GET", "/engines/shared-name"), ("DELETE", "/engines/shared-name"),
                         ("POST", "/engines/shared-name/start"), ("POST", "/engines/shared-name/stop"),
                         ("POST", "/engines/shared-name/rotate-key")):
        assert_envelope(await client.request(method, path, headers=pk(b_key)), 404, "ENGINE_NOT_FOUND")
    for body in (None, {"auto_wake": True}):
        r = await client.post("/engines/shared-name/admit", json=body, headers=pk(b_key))
        assert r.status_code == 200
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}
    assert (await client.get("/engines", headers=pk(b_key))).json() == {"engines": [], "total": 0}
    status = (await client.get("/status", headers=pk(b_key))).json()
    assert status["total"] == 0 and status["by_status"]["running"] == 0
    metrics = (await client.get("/metrics", headers=pk(b_key))).json()
    assert metrics["provisions_1h"] == 0 and metrics["total_provisions"] == 0

    # A's engine is untouched by all of that
    r = await client.get("/engines/shared-name", headers=pk(a_key))
    got = r.json()
    assert (got["engine_id"], got["status"], got["api_key"]) == (a_engine["engine_id"], "running",
                                                                a_engine["api_key"])
    assert (await client.get("/status", headers=pk(a_key))).json()["by_status"]["running"] == 1

    # the same user_id in B is an unrelated engine
    r = await client.post("/engines/shared-name/admit", json={"auto_provision": True}, headers=pk(b_key))
    b_engine = r.json()["engine"]
    assert r.json()["admitted"] is True
    assert b_engine["engine_id"] != a_engine["engine_id"]
    assert b_engine["api_key"] != a_engine["api_key"] and b_engine["url"] != a_engine["url"]
    a_list = (await client.get("/engines", headers=pk(a_key))).json()
    b_list = (await client.get("/engines", headers=pk(b_key))).json()
    assert [e["engine_id"] for e in a_list["engines"]] == [a_engine["engine_id"]] and a_list["total"] == 1
    assert [e["engine_id"] for e in b_list["engines"]] == [b_engine["engine_id"]] and b_list["total"] == 1
    assert (await client.get("/metrics", headers=pk(b_key))).json()["total_provisions"] == 1

    # B destroying its engine leaves A's running
    r = await client.delete("/engines/shared-name", headers=pk(b_key))
    assert r.json() == {"status": "destroyed", "engine_id": b_engine["engine_id"]}
    assert (await client.get("/engines/shared-name", headers=pk(a_key))).json()["status"] == "running"
    rows = await pool_of(app).fetch("SELECT product_id FROM engines WHERE user_id = 'shared-name' "
                                    "AND product_id = ANY($1::uuid[])", [a_id, b_id])
    assert [r["product_id"] for r in rows] == [a_id]
    # B's metrics count B's destroy only; A's none
    assert (await client.get("/metrics", headers=pk(a_key))).json()["total_destroys"] == 0
    assert (await client.get("/metrics", headers=pk(b_key))).json()["total_destroys"] == 1
