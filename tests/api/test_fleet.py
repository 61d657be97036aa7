"""GET /engines (pagination, filter, order, total), GET /status (health verdict), GET /metrics."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import insert_engine_row, pk, pool_of, register_product

STATES = ["provisioning", "running", "sleeping", "stopped", "failed", "destroying"]


async def test_list_pagination_filter_and_order(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client)
    pool = pool_of(app)
    t0 = datetime(2024, 1, 1, tzinfo=UTC)
    # created out of order; two share a timestamp and are then ordered by engine_id
    same = sorted([str(uuid.uuid4()), str(uuid.uuid4())])
    specs = [("u-late", "stopped", t0 + timedelta(hours=3), None), ("u-first", "running", t0, None),
             ("u-tie-b", "failed", t0 + timedelta(hours=1), same[1]),
             ("u-tie-a", "stopped", t0 + timedelta(hours=1), same[0]),
             ("u-mid", "sleeping", t0 + timedelta(hours=2), None)]
    for user, status, created, engine_id in specs:
        await insert_engine_row(pool, settings, product_id, user, status, created_at=created, engine_id=engine_id)
    expected = ["u-first", "u-tie-a", "u-tie-b", "u-mid", "u-late"]

    doc = (await client.get("/engines", headers=pk(key))).json()
    assert doc["total"] == 5
    assert [e["user_id"] for e in doc["engines"]] == expected
    assert all("api_key" not in e for e in doc["engines"])
    assert doc["engines"][0]["created_at"] == "2024-01-01T00:00:00.000Z"

    pages = []
    for offset in (0, 2, 4, 6):
        page = (await client.get(f"/engines?limit=2&offset={offset}", headers=pk(key))).json()
        assert page["total"] == 5
        pages.append([e["user_id"] for e in page["engines"]])
    assert pages == [expected[0:2], expected[2:4], expected[4:], []]

    stopped = (await client.get("/engines?status=stopped", headers=pk(key))).json()
    assert [e["user_id"] for e in stopped["engines"]] == ["u-tie-a", "u-late"] and stopped["total"] == 2
    one = (await client.get("/engines?status=stopped&limit=1&offset=1", headers=pk(key))).json()
    assert [e["user_id"] for e in one["engines"]] == ["u-late"] and one["total"] == 2
    none = (await client.get("/engines?status=destroying", headers=pk(key))).json()
    assert none == {"engines": [], "total": 0}


async def test_status_health_verdicts(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client)
    pool = pool_of(app)
    ids = [await insert_engine_row(pool, settings, product_id, f"u{i}", "running") for i in range(11)]

    async def status() -> dict[str, Any]:
        r = await client.get("/status", headers=pk(key))
        assert r.status_code == 200
        doc: dict[str, Any] = r.json()
        assert set(doc) == {"total", "by_status", "health", "unhealthy_count", "warm"}
        assert isinstance(doc["by_status"], dict) and sorted(doc["by_status"]) == sorted(STATES)
        return doc

    doc = await status()
    assert (doc["total"], doc["health"], doc["unhealthy_count"]) == (11, "ok", 0)
    assert doc["by_status"] == {s: (11 if s == "running" else 0) for s in STATES}

    await pool.execute("UPDATE engines SET status = 'failed' WHERE id = $1", ids[0])
    doc = await status()  # 1 of 11 failed: under 10 %
    assert (doc["total"], doc["health"], doc["unhealthy_count"]) == (11, "degraded", 1)
    assert doc["by_status"]["failed"] == 1 and doc["by_status"]["running"] == 10

    await pool.execute("DELETE FROM engines WHERE id = $1", ids[1])
    doc = await status()  # 1 of 10: exactly 10 %
    assert (doc["total"], doc["health"], doc["unhealthy_count"]) == (10, "critical", 1)

    await pool.execute("UPDATE engines SET status = 'stopped' WHERE id = ANY($1::uuid[])", ids[2:5])
    await pool.execute("UPDATE engines SET status = 'sleeping' WHERE id = $1", ids[5])
    doc = await status()
    assert doc["by_status"] == {"provisioning": 0, "running": 5, "sleeping": 1, "stopped": 3, "failed": 1,
                                "destroying": 0}
    await pool.execute("UPDATE engines SET status = 'running' WHERE id = $1", ids[0])
    assert (await status())["health"] == "ok"


async def test_metrics_after_provision_and_destroy(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    empty = (await client.get("/metrics", headers=pk(key))).json()
    assert empty == {"provisions_1h": 0, "crashes_1h": 0, "restarts_1h": 0, "avg_boot_ms": None,
                     "total_provisions": 0, "total_destroys": 0}

    r = await client.post("/engines/provision", json={"user_id": "m1"}, headers=pk(key))
    assert r.status_code == 200
    after = (await client.get("/metrics", headers=pk(key))).json()
    assert set(after) == set(empty)
    assert (after["provisions_1h"], after["total_provisions"], after["total_destroys"]) == (1, 1, 0)
    assert (after["crashes_1h"], after["restarts_1h"]) == (0, 0)
    assert isinstance(after["avg_boot_ms"], int | float) and after["avg_boot_ms"] > 0

    assert (await client.delete("/engines/m1", headers=pk(key))).status_code == 200
    done = (await client.get("/metrics", headers=pk(key))).json()
    assert (done["provisions_1h"], done["total_provisions"], done["total_destroys"]) == (1, 1, 1)
    assert done["avg_boot_ms"] == after["avg_boot_ms"]


async def test_metrics_rolling_hour(client: httpx.AsyncClient, app: FastAPI) -> None:
    """Old audit rows count in the totals only; crashes and restarts come from their actions."""
    product_id, key = await register_product(client)
    pool = pool_of(app)
    old = datetime.now(UTC) - timedelta(hours=2)
    rows = [(old, "provision", 100), (old, "destroy", None), (old, "health_failed", None),
            (old, "auto_restart_start", None), (None, "health_failed", None), (None, "health_failed", None),
            (None, "auto_restart_start", None), (None, "auto_restart_success", None), (None, "wake", None)]
    for ts, action, ms in rows:
        await pool.execute("INSERT INTO audit_log (timestamp, product_id, action, duration_ms) "
                           "VALUES (coalesce($1, now()), $2, $3, $4)", ts, product_id, action, ms)
    doc = (await client.get("/metrics", headers=pk(key))).json()
    assert doc == {"provisions_1h": 0, "crashes_1h": 2, "restarts_1h": 1, "avg_boot_ms": None,
                   "total_provisions": 1, "total_destroys": 1}
