"""GET /audit with X-Platform-Key: the calling product's rows, newest first, filtered, paged by an opaque
keyset cursor (every row exactly once, rows written meanwhile only on a fresh first page); with
X-Admin-Key the operator's form as before. Rows are inserted with SQL (crafted users, engines, times)
on the real Postgres of the fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine import audit
from tests.conftest import ADMIN_KEY, assert_envelope, pk, pool_of, register_product

ADM = {"X-Admin-Key": ADMIN_KEY}
T0 = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
EVENT_KEYS = {"id", "timestamp", "action", "user_id", "engine_id", "actor", "metadata", "duration_ms"}


async def add(pool: asyncpg.Pool, product_id: str, action: str, *, user_id: str | None = None,
              engine_id: str | None = None, ts: datetime | None = None, metadata: dict[str, object] | None = None,
              state: str | None = None) -> int:
    row_id = await pool.fetchval(
        "INSERT INTO audit_log (timestamp, product_id, user_id, engine_id, action, actor, metadata, state) "
        "VALUES (coalesce($1, now()), $2, $3, $4, $5, 'system', $6, $7) RETURNING id",
        ts, product_id, user_id, engine_id, action, metadata or {}, state)
    assert isinstance(row_id, int)
    return row_id


async def all_pages(client: httpx.AsyncClient, key: str, limit: int, **params: str) -> list[list[dict[str, Any]]]:
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    while True:
        query = {**params, "limit": str(limit), **({"cursor": cursor} if cursor else {})}
        r = await client.get("/audit", params=query, headers=pk(key))
        assert r.status_code == 200, r.text
        doc = r.json()
        assert set(doc) == {"events", "next_cursor"}
        pages.append(doc["events"])
        cursor = doc["next_cursor"]
        if cursor is None:
            return pages
        assert len(doc["events"]) == limit  # a cursor is only handed out with a full page behind it


async def ids_of(pool: asyncpg.Pool, product_id: str) -> list[int]:
    return [r["id"] for r in await pool.fetch("SELECT id FROM audit_log WHERE product_id = $1 ORDER BY id DESC",
                                              product_id)]


@pytest.fixture
async def product(client: httpx.AsyncClient) -> tuple[str, str]:
    return await register_product(client)


async def test_paging_visits_every_row_once_while_rows_are_written(client: httpx.AsyncClient, app: FastAPI,
                                                                   product: tuple[str, str]) -> None:
    product_id, key = product
    pool = pool_of(app)
    engine = str(uuid.uuid4())
    for i in range(11):  # with the policy_register row: 12 rows, a multiple of 1, 2 and 3
        action = ("health_check", "admit_denied", "stop", "start")[i % 4]
        meta: dict[str, object] = {"reason": f"r{i}", "count": 1} if action == "admit_denied" else {}
        await add(pool, product_id, action, user_id=f"u{i % 3}", engine_id=engine, metadata=meta)
    written: list[int] = []

    async def writer() -> None:
        while True:
            written.append(await add(pool, product_id, "health_check", user_id="late", engine_id=engine))
            await asyncio.sleep(0.002)

    for limit in (1, 2, 3):
        before = await ids_of(pool, product_id)
        task = asyncio.create_task(writer())
        try:
            pages = await all_pages(client, key, limit)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        seen = [e["id"] for page in pages for e in page]
        assert len(seen) == len(set(seen)), "a row was returned twice"
        assert seen == sorted(seen, reverse=True)  # newest first, across pages too
        first_top = pages[0][0]["id"]
        # every row that existed when paging began, and of the rows written meanwhile only those that the
        # first page could see; nothing newer than the first page's top row on any later page
        assert set(before) <= set(seen)
        assert all(i <= first_top for i in seen)
        assert set(seen) - set(before) <= {i for i in written if i <= first_top}
        assert any(i > first_top for i in written)  # rows were written while the later pages were read
        fresh = (await client.get("/audit", params={"limit": "1"}, headers=pk(key))).json()
        assert fresh["events"][0]["id"] > first_top  # a fresh first page shows the new rows
    # an exact multiple: the last full page says there is nothing after it
    total = len(await ids_of(pool, product_id))
    pages = await all_pages(client, key, total)
    assert len(pages) == 1 and len(pages[0]) == total


async def test_shape_order_and_all_actions(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, key = product
    pool = pool_of(app)
    engine = str(uuid.uuid4())
    denied = await add(pool, product_id, "admit_denied", ts=T0, metadata={"reason": "engine_not_found", "count": 3})
    check = await add(pool, product_id, "health_check", user_id="alice", engine_id=engine, ts=T0)
    r = await client.get("/audit", headers=pk(key))
    assert r.status_code == 200
    events = r.json()["events"]
    assert r.json()["next_cursor"] is None
    assert [e["id"] for e in events][:2] == [check, denied] and events[-1]["action"] == "policy_register"
    assert all(set(e) == EVENT_KEYS for e in events)
    assert events[0] == {"id": check, "timestamp": "2024-03-01T12:00:00.000Z", "action": "health_check",
                         "user_id": "alice", "engine_id": engine, "actor": "system", "metadata": {},
                         "duration_ms": None}
    assert events[1]["metadata"] == {"reason": "engine_not_found", "count": 3} and events[1]["user_id"] is None


async def test_filters(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, key = product
    pool = pool_of(app)
    e1, e2 = str(uuid.uuid4()), str(uuid.uuid4())
    rows = {
        "a1": await add(pool, product_id, "provision", user_id="alice", engine_id=e1, ts=T0),
        "a2": await add(pool, product_id, "stop", user_id="alice", engine_id=e1, ts=T0 + timedelta(hours=1)),
        "b1": await add(pool, product_id, "provision", user_id="bob", engine_id=e2, ts=T0 + timedelta(hours=2)),
        "a3": await add(pool, product_id, "start", user_id="alice", engine_id=e1, ts=T0 + timedelta(hours=3)),
        "b2": await add(pool, product_id, "stop", user_id="bob", engine_id=e2, ts=T0 + timedelta(hours=4)),
    }

    async def found(limit: int = 2, **params: str) -> list[str]:
        names = {v: k for k, v in rows.items()}
        pages = await all_pages(client, key, limit, **params)
        return [names.get(e["id"], e["action"]) for page in pages for e in page]

    assert await found(user_id="alice") == ["a3", "a2", "a1"]
    assert await found(engine_id=e2) == ["b2", "b1"]
    assert await found(engine_id=e2.upper()) == ["b2", "b1"]  # canonical form
    assert await found(action="provision") == ["b1", "a1"]
    assert await found(user_id="alice", action="stop") == ["a2"]
    assert await found(user_id="bob", engine_id=e1) == []
    since, until = (T0 + timedelta(hours=1)).isoformat(), "2024-03-01T16:30:00+01:00"  # = 15:30Z
    assert await found(since=since, until=until) == ["a3", "b1", "a2"]  # [since, until)
    assert await found(since=since.replace("+00:00", "Z"), until=until) == ["a3", "b1", "a2"]
    assert await found(1, since=since, until=until, user_id="alice") == ["a3", "a2"]
    assert await found(until=T0.isoformat()) == []
    assert await found(since="2024-03-01T16:00:00.000001Z") == ["policy_register"]  # registered today


async def test_tenant_isolation(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    a_id, a_key = product
    b_id, b_key = await register_product(client)
    pool = pool_of(app)
    engine = str(uuid.uuid4())
    for _ in range(3):
        await add(pool, a_id, "start", user_id="shared", engine_id=engine)
    b_rows = {e["id"] for page in await all_pages(client, b_key, 1) for e in page}
    assert b_rows == set(await ids_of(pool, b_id))  # only B's own rows (its policy_register)
    for params in ({"engine_id": engine}, {"user_id": "shared"}, {"action": "start"}):
        r = await client.get("/audit", params=params, headers=pk(b_key))
        assert r.json() == {"events": [], "next_cursor": None}, params
    # A's cursor used by B pages B's rows only
    r = await client.get("/audit", params={"limit": "1"}, headers=pk(a_key))
    r = await client.get("/audit", params={"cursor": r.json()["next_cursor"]}, headers=pk(b_key))
    assert {e["id"] for e in r.json()["events"]} <= set(await ids_of(pool, b_id))


async def test_bad_parameters_are_400(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, key = product
    for _ in range(3):
        await add(pool_of(app), product_id, "stop")
    good = (await client.get("/audit", params={"limit": "1"}, headers=pk(key))).json()["next_cursor"]
    assert good is not None
    assert good.startswith("v1:")
    bad: list[dict[str, str]] = [
        {"limit": "0"}, {"limit": "1001"}, {"limit": "abc"}, {"limit": "+5"}, {"limit": ""},
        *({"cursor": c} for c in ("garbage", good + "x", "x" + good, good.replace("v1", "v2"), good[3:], "v1:", "",
                                  "v1:0", "v1:012", "v1:-5", "v1: 5", "v1:5 ", "v1:1e3", "v1:" + "9" * 19,
                                  "djE6NQ", "v1:²")),
        {"since": "yesterday"}, {"since": "1700000000"}, {"since": "2024-03-01T12:00:00"}, {"since": "2024-03-01"},
        {"since": "2024-13-01T00:00:00Z"}, {"since": ""}, {"since": "2024-03-01T24:00:00Z"},
        {"until": "now"}, {"engine_id": "not-a-uuid"}, {"engine_id": "urn:uuid:" + product_id},
        {"user_id": "bad id"}, {"action": "Stop"},
        {"bogus": "1"}, {"product_id": product_id}, {"after_id": "0"},  # unknown, or the operator's form only
    ]
    for params in bad:
        r = await client.get("/audit", params=params, headers=pk(key))
        assert_envelope(r, 400, "VALIDATION_ERROR")
    # the good cursor still works, so does any the pattern admits; limit bounds are inclusive
    for cursor in (good, "v1:1", "v1:" + "9" * 18):
        assert (await client.get("/audit", params={"cursor": cursor}, headers=pk(key))).status_code == 200
    # instants past what Python holds in UTC are before (after) every row, not an error
    r = await client.get("/audit", params={"until": "0001-01-01T00:00:00+01:00"}, headers=pk(key))
    assert r.status_code == 200 and r.json()["events"] == []
    r = await client.get("/audit", params={"since": "9999-12-31T23:59:59-01:00"}, headers=pk(key))
    assert r.status_code == 200 and r.json()["events"] == []
    r = await client.get("/audit", params={"since": "0001-01-01T00:00:00+01:00", "limit": "1000"}, headers=pk(key))
    assert len(r.json()["events"]) == 4
    for limit in ("1", "1000"):
        assert (await client.get("/audit", params={"limit": limit}, headers=pk(key))).status_code == 200


async def test_keys(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    product_id, key = product
    assert_envelope(await client.get("/audit"), 401, "INVALID_ADMIN_KEY")  # as before: no key
    assert_envelope(await client.get("/audit", headers=pk("pk-sept-" + "0" * 64)), 401, "INVALID_PLATFORM_KEY")
    assert_envelope(await client.get("/audit", headers=pk(ADMIN_KEY)), 401, "INVALID_PLATFORM_KEY")
    assert_envelope(await client.get("/audit", headers={"X-Admin-Key": key}), 401, "INVALID_ADMIN_KEY")
    # both keys: the admin key decides (a wrong one is refused even beside a good platform key)
    assert_envelope(await client.get("/audit", headers={**pk(key), "X-Admin-Key": "wrong"}), 401,
                    "INVALID_ADMIN_KEY")
    r = await client.get("/audit", params={"product_id": product_id}, headers={**pk(key), **ADM})
    assert r.status_code == 200 and set(r.json()) == {"events"} and "product_id" in r.json()["events"][0]
    # an empty admin header is no admin key: the platform key is used
    r = await client.get("/audit", headers={**pk(key), "X-Admin-Key": ""})
    assert r.status_code == 200 and set(r.json()) == {"events", "next_cursor"}


async def test_admin_form_is_unchanged(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, _ = product
    pool = pool_of(app)
    ids = [await add(pool, product_id, "stop", user_id="u") for _ in range(55)]
    r = await client.get("/audit", params={"product_id": product_id}, headers=ADM)
    assert r.status_code == 200 and set(r.json()) == {"events"}
    events = r.json()["events"]
    assert len(events) == 50 and [e["id"] for e in events] == ids[::-1][:50]  # default limit 50, newest first
    assert set(events[0]) == EVENT_KEYS | {"product_id"} and events[0]["product_id"] == product_id
    tail = (await client.get("/audit", params={"product_id": product_id, "after_id": str(ids[51])},
                             headers=ADM)).json()["events"]
    assert [e["id"] for e in tail] == ids[52:]  # after_id: oldest first
    for params in ({"cursor": "v1:5"}, {"since": "2024-03-01T12:00:00Z"}, {"user_id": "u"},
                   {"engine_id": str(uuid.uuid4())}, {"until": "2024-03-01T12:00:00Z"}):
        assert_envelope(await client.get("/audit", params=params, headers=ADM), 400, "VALIDATION_ERROR")


class _Explain:
    """A connection whose fetch answers the plan of the statement instead of its rows. On the small
    tables of a test the planner may well read and sort a few rows instead: with sequential scans, bitmap
    scans and sorts off it shows the ordered index walk the statement allows (what it picks at scale)."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def fetch(self, sql: str, *args: object) -> list[object]:
        await self.conn.execute("SET LOCAL enable_seqscan = off; SET LOCAL enable_bitmapscan = off; "
                                "SET LOCAL enable_sort = off")
        self.plans.append("\n".join(r[0] for r in await self.conn.fetch("EXPLAIN " + sql, *args)))
        return []


async def test_queries_walk_the_indexes(app: FastAPI, product: tuple[str, str]) -> None:
    product_id, _ = product
    async with pool_of(app).acquire() as conn, conn.transaction():
        explain = _Explain(conn)
        for kwargs, index in (({}, "audit_log_product_id"), ({"user_id": "u"}, "audit_log_product_user"),
                              ({"engine_id": str(uuid.uuid4())}, "audit_log_product_engine"),
                              ({"before_id": 10, "action": "stop", "since": T0}, "audit_log_product_id")):
            await audit.page(explain, product_id, 101, **kwargs)
            plan = explain.plans[-1]
            assert f"Index Scan Backward using {index}" in plan, plan
            assert "Sort" not in plan, plan  # the index order is the answer's order: it stops after the limit
