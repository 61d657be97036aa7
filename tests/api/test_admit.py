"""Admit's answers for every engine state (spec/API.md "Discovery and admission")."""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from bap_engine import registry
from bap_engine.config import Settings
from tests.conftest import insert_engine_row, pk, pool_of, register_product, services_of

REASONS = {"sleeping": "engine_sleeping", "failed": "engine_unhealthy", "stopped": "engine_stopped",
           "destroying": "engine_destroying"}


async def test_not_admitted_reasons(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    """Bare rows in each state: the reason, and auto_provision never re-provisions an existing engine."""
    product_id, key = await register_product(client)
    pool = pool_of(app)
    for status in REASONS:
        await insert_engine_row(pool, settings, product_id, f"user-{status}", status)
    for status, reason in REASONS.items():
        bodies = [None, {"auto_provision": True}] + ([] if status == "sleeping" else [{"auto_wake": True}])
        for body in bodies:
            r = await client.post(f"/engines/user-{status}/admit", json=body, headers=pk(key))
            assert r.status_code == 200
            assert r.json() == {"admitted": False, "engine": None, "reason": reason}, (status, body)
    rows = await pool.fetch("SELECT user_id, status FROM engines WHERE product_id = $1 ORDER BY user_id", product_id)
    assert [(r["user_id"], r["status"]) for r in rows] == sorted((f"user-{s}", s) for s in REASONS)


async def test_sleeping_engine_is_woken_only_with_auto_wake(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "sleepy"}, headers=pk(key))
    engine = r.json()
    lifecycle = services_of(app).lifecycle
    async with pool_of(app).acquire() as conn:
        row = await registry.get_engine(conn, product_id, "sleepy")
    assert row is not None
    assert await lifecycle.sleep(row, idle_s=1000) is True
    assert (await client.get("/engines/sleepy", headers=pk(key))).json()["status"] == "sleeping"

    r = await client.post("/engines/sleepy/admit", json={"auto_provision": True}, headers=pk(key))
    assert r.json() == {"admitted": False, "engine": None, "reason": "engine_sleeping"}
    r = await client.post("/engines/sleepy/admit", json={"auto_wake": True}, headers=pk(key))
    doc = r.json()
    assert doc["admitted"] is True
    assert (doc["engine"]["engine_id"], doc["engine"]["status"], doc["engine"]["api_key"]) == (
        engine["engine_id"], "running", engine["api_key"])
    async with httpx.AsyncClient(base_url=engine["url"], timeout=5) as direct:
        assert (await direct.get("/history", headers={"X-Engine-Key": engine["api_key"]})).status_code == 200
    actions = await pool_of(app).fetch(
        "SELECT action, actor FROM audit_log WHERE product_id = $1 AND engine_id IS NOT NULL ORDER BY id", product_id)
    assert [r["action"] for r in actions] == ["provision", "sleep", "wake"]
    assert actions[2]["actor"] != "system"  # woken by the product's admit
