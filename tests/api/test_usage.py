"""GET /usage: seconds per user in running, sleeping and stopped inside [since, until), and provisions,
wakes and restarts, from the audit log's transitions (`audit_log.state`). Exact to the second on rows
inserted with crafted timestamps; consistent with wall time on a real provision, stop and start."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from tests.conftest import assert_envelope, pk, pool_of, register_product

T0 = datetime(2024, 3, 1, tzinfo=UTC)  # the window is [T0, T0 + 10 h)
WINDOW = {"since": "2024-03-01T00:00:00Z", "until": "2024-03-01T10:00:00Z"}
ZERO = {"running_s": 0, "sleeping_s": 0, "stopped_s": 0, "provisions": 0, "wakes": 0, "restarts": 0}
H = 3600


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


async def add(pool: asyncpg.Pool, product_id: str, engine_id: str, ts: datetime, action: str, state: str | None,
              user_id: str | None) -> None:
    await pool.execute(
        "INSERT INTO audit_log (timestamp, product_id, user_id, engine_id, action, state) "
        "VALUES ($1, $2, $3, $4, $5, $6)",
        ts, product_id, user_id, engine_id, action, state)


def figures(**values: int) -> dict[str, int]:
    return {**ZERO, **values}


async def crafted(pool: asyncpg.Pool, product_id: str) -> None:
    """Engines of alice, bob, carol (a claimed pool engine), dave, erin, frank and someone after the window."""
    e = {name: str(uuid.uuid4()) for name in ("alice", "bob", "pool", "dave", "erin", "frank1", "frank2", "late")}
    rows: list[tuple[str, float, str, str | None, str | None]] = [
        # alice: running from before the window, stopped, started, slept, woken, destroyed inside it
        ("alice", -2 * H, "provision", "running", "alice"),
        ("alice", 1 * H, "stop", "stopped", "alice"),
        ("alice", 2 * H, "health_check", None, "alice"),  # no transition
        ("alice", 3 * H, "start", "running", "alice"),
        ("alice", 5 * H, "sleep", "sleeping", "alice"),
        ("alice", 6 * H, "wake", "running", "alice"),
        ("alice", 8 * H, "destroy", "destroying", "alice"),
        ("alice", 8 * H + 30, "destroy", "gone", "alice"),
        # bob: provisioned inside, crashed, restarted, still running at the end of the window
        ("bob", 2 * H, "provision", "running", "bob"),
        ("bob", 4 * H, "health_failed", "failed", "bob"),
        ("bob", 4 * H + 10, "auto_restart_start", None, "bob"),
        ("bob", 4 * H + 90, "auto_restart_success", "running", "bob"),
        # a warm-pool engine: booted for no one, claimed by carol
        ("pool", -1 * H, "pool_fill", "running", None),
        ("pool", 7 * H, "pool_claim", "running", "carol"),
        # dave: stopped before the window, nothing since: stopped throughout
        ("dave", -5 * H, "provision", "running", "dave"),
        ("dave", -4 * H, "stop", "stopped", "dave"),
        # erin: gone before the window
        ("erin", -3 * H, "provision", "running", "erin"),
        ("erin", -2 * H, "destroy", "gone", "erin"),
        # frank: two fractional intervals, 3599.6 s + 0.5 s: floored per user (3600), not per interval (3599)
        ("frank1", 9 * H + 0.4, "provision", "running", "frank"),
        ("frank2", 10 * H - 0.5, "provision", "running", "frank"),
        # after the window: nothing of it counts
        ("late", 10 * H, "provision", "running", "late"),
        ("alice", 10 * H + 1, "wake", "running", "alice"),
    ]
    for engine, offset, action, state, user in rows:
        await add(pool, product_id, e[engine], at(offset), action, state, user)


EXPECTED = {
    "alice": figures(running_s=H + 2 * H + 2 * H, stopped_s=2 * H, sleeping_s=H, wakes=1),
    "bob": figures(running_s=2 * H + (6 * H - 90), provisions=1, restarts=1),
    "carol": figures(running_s=3 * H, provisions=1),
    "dave": figures(stopped_s=10 * H),
    "frank": figures(running_s=3600, provisions=2),
}


def _totals(users: list[dict[str, Any]]) -> dict[str, int]:
    return {k: sum(u[k] for u in users) for k in ZERO}


@pytest.fixture
async def product(client: httpx.AsyncClient) -> tuple[str, str]:
    return await register_product(client)


async def test_exact_figures(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, key = product
    await crafted(pool_of(app), product_id)
    r = await client.get("/usage", params=WINDOW, headers=pk(key))
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["since"] == "2024-03-01T00:00:00.000Z" and doc["until"] == "2024-03-01T10:00:00.000Z"
    assert [u["user_id"] for u in doc["users"]] == sorted(EXPECTED)
    assert {u.pop("user_id"): u for u in doc["users"]} == EXPECTED
    assert doc["totals"] == _totals(list(EXPECTED.values()))
    # offsets are read as such: the same window written in +02:00
    same = {"since": "2024-03-01T02:00:00+02:00", "until": "2024-03-01T12:00:00+02:00"}
    assert (await client.get("/usage", params=same, headers=pk(key))).json()["totals"] == doc["totals"]


async def test_user_filter_and_sub_windows(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, key = product
    await crafted(pool_of(app), product_id)
    for user, expected in EXPECTED.items():
        doc = (await client.get("/usage", params={**WINDOW, "user_id": user}, headers=pk(key))).json()
        assert doc["users"] == [{"user_id": user, **expected}] and doc["totals"] == expected
    doc = (await client.get("/usage", params={**WINDOW, "user_id": "erin"}, headers=pk(key))).json()
    assert doc["users"] == [] and doc["totals"] == ZERO
    # a window inside alice's sleep: what was entered before counts from the window's start
    doc = (await client.get("/usage", params={"since": "2024-03-01T05:30:00Z", "until": "2024-03-01T05:40:00Z",
                                              "user_id": "alice"}, headers=pk(key))).json()
    assert doc["users"] == [{"user_id": "alice", **figures(sleeping_s=600)}]
    # until in the past closes the open intervals there: bob from 09:00 to 09:30
    doc = (await client.get("/usage", params={"since": "2024-03-01T09:00:00Z", "until": "2024-03-01T09:30:00Z",
                                              "user_id": "bob"}, headers=pk(key))).json()
    assert doc["totals"] == figures(running_s=1800)


async def test_tenant_isolation(client: httpx.AsyncClient, app: FastAPI, product: tuple[str, str]) -> None:
    product_id, _ = product
    await crafted(pool_of(app), product_id)
    _, other = await register_product(client)
    doc = (await client.get("/usage", params=WINDOW, headers=pk(other))).json()
    assert doc["users"] == [] and doc["totals"] == ZERO


async def test_open_interval_counts_until_now(client: httpx.AsyncClient, app: FastAPI,
                                              product: tuple[str, str]) -> None:
    product_id, key = product
    pool = pool_of(app)
    db_now: datetime = await pool.fetchval("SELECT now()")
    await add(pool, product_id, str(uuid.uuid4()), db_now - timedelta(seconds=100), "provision", "running", "gina")
    since, until = db_now - timedelta(hours=1), db_now + timedelta(days=1)  # until in the future: clamped to now
    started = time.monotonic()
    doc = (await client.get("/usage", params={"since": since.isoformat(), "until": until.isoformat()},
                            headers=pk(key))).json()
    elapsed = time.monotonic() - started
    assert doc["users"][0]["user_id"] == "gina"
    assert 100 <= doc["users"][0]["running_s"] <= 100 + elapsed + 1
    # the defaults: until now, since 24 h before
    doc = (await client.get("/usage", headers=pk(key))).json()
    since_d, until_d = datetime.fromisoformat(doc["since"]), datetime.fromisoformat(doc["until"])
    assert until_d - since_d == timedelta(hours=24) and abs((until_d - datetime.now(UTC)).total_seconds()) < 60
    assert doc["users"][0]["running_s"] >= 100 and doc["totals"]["provisions"] == 1


async def test_bad_windows_are_400(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    _, key = product
    for params in ({"since": "2024-03-01T10:00:00Z", "until": "2024-03-01T10:00:00Z"},
                   {"since": "2024-03-02T00:00:00Z", "until": "2024-03-01T00:00:00Z"},
                   {"since": "2023-01-01T00:00:00Z", "until": "2024-03-01T00:00:00Z"},  # > 400 days
                   {"since": "2099-01-01T00:00:00Z"},  # after the default until (now)
                   {"since": "yesterday"}, {"since": "1700000000"}, {"until": "2024-03-01T00:00:00"},
                   {"until": "0001-01-01T00:00:00Z"}, {"user_id": "bad id"}, {"bogus": "1"}, {"limit": "5"}):
        assert_envelope(await client.get("/usage", params=params, headers=pk(key)), 400, "VALIDATION_ERROR")
    ok = {"since": "2023-01-26T00:00:00Z", "until": "2024-03-01T00:00:00Z"}  # exactly 400 days
    assert (await client.get("/usage", params=ok, headers=pk(key))).status_code == 200


async def test_keys(client: httpx.AsyncClient) -> None:
    assert_envelope(await client.get("/usage"), 401, "INVALID_PLATFORM_KEY")
    assert_envelope(await client.get("/usage", headers=pk("pk-sept-" + "0" * 64)), 401, "INVALID_PLATFORM_KEY")


async def test_a_real_lifecycle_matches_wall_time(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    _, key = product

    async def timed(method: str, path: str, **kwargs: Any) -> tuple[float, float]:
        before = time.time()
        r = await client.request(method, path, headers=pk(key), **kwargs)
        assert r.status_code == 200, r.text
        return before, time.time()

    since = datetime.now(UTC) - timedelta(seconds=5)
    provision = await timed("POST", "/engines/provision", json={"user_id": "walker"})
    await asyncio.sleep(2.2)
    stop = await timed("POST", "/engines/walker/stop")
    await asyncio.sleep(1.6)
    start = await timed("POST", "/engines/walker/start")
    await asyncio.sleep(1.3)
    asked = time.time()
    doc = (await client.get("/usage", params={"since": since.isoformat()}, headers=pk(key))).json()
    answered = time.time()
    [walker] = doc["users"]
    # each transition happened during its call: the figures lie between the bounds these give (1 s slack
    # for the flooring)
    running_lo = (stop[0] - provision[1]) + (asked - start[1])
    running_hi = (stop[1] - provision[0]) + (answered - start[0])
    stopped_lo, stopped_hi = start[0] - stop[1], start[1] - stop[0]
    assert running_lo - 1 <= walker["running_s"] <= running_hi, (walker, running_lo, running_hi)
    assert stopped_lo - 1 <= walker["stopped_s"] <= stopped_hi, (walker, stopped_lo, stopped_hi)
    assert walker["running_s"] >= 3 and walker["stopped_s"] >= 1
    assert (walker["provisions"], walker["wakes"], walker["restarts"], walker["sleeping_s"]) == (1, 0, 0, 0)
    await client.delete("/engines/walker", headers=pk(key))
