"""Concurrency on real Postgres: one engine for N concurrent admits, one rate limit for N replicas."""

from __future__ import annotations

import asyncio

import httpx
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import ResponseLog, assert_envelope, open_app, pk, pool_of, register_product, services_of


async def test_concurrent_auto_provision_admits_create_one_engine(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    product_id, key = await register_product(client)
    answers = await asyncio.gather(*[
        client.post("/engines/crowd/admit", json={"auto_provision": True}, headers=pk(key)) for _ in range(20)
    ])
    assert [r.status_code for r in answers] == [200] * 20
    docs = [r.json() for r in answers]
    assert all(d["admitted"] is True for d in docs), [d for d in docs if not d["admitted"]]
    assert len({d["engine"]["engine_id"] for d in docs}) == 1
    assert len({d["engine"]["api_key"] for d in docs}) == 1
    assert {d["engine"]["status"] for d in docs} == {"running"}
    pool = pool_of(app)
    assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 1
    actions = await pool.fetch("SELECT action FROM audit_log WHERE product_id = $1 AND action LIKE 'provision%'",
                               product_id)
    assert [r["action"] for r in actions] == ["provision"]
    engines = sorted(p.name for p in (settings.data_dir / "engines").iterdir())
    assert engines == [docs[0]["engine"]["engine_id"]]


async def test_rate_limit_is_shared_by_two_replicas(settings: Settings, response_log: ResponseLog) -> None:
    async with open_app(settings, response_log) as (app1, c1), open_app(settings, response_log) as (app2, c2):
        product_id, key = await register_product(c1, policy={"rate_limit_rpm": 10})
        r = await c1.post("/engines/provision", json={"user_id": "busy"}, headers=pk(key))
        assert r.status_code == 200  # provision itself does not spend admit tokens
        admitted = 0
        limited: list[httpx.Response] = []
        for _ in range(15):
            for c in (c1, c2):
                r = await c.post("/engines/busy/admit", headers=pk(key))
                if r.status_code == 200:
                    assert r.json()["admitted"] is True
                    admitted += 1
                else:
                    limited.append(r)
        assert admitted == 10
        assert len(limited) == 20
        for r in limited:
            assert_envelope(r, 429, "RATE_LIMITED")
            assert 1 <= int(r.headers["Retry-After"]) <= 60
        # other products are not limited by this one's budget
        _, other = await register_product(c2, policy={"rate_limit_rpm": 10})
        r = await c2.post("/engines/busy/admit", headers=pk(other))
        assert r.status_code == 200 and r.json()["reason"] == "engine_not_found"

        # rate-limited admits are audited coalesced: never one row per request
        await services_of(app1).discovery.flush()
        await services_of(app2).discovery.flush()
        rows = await pool_of(app1).fetch(
            "SELECT metadata FROM audit_log WHERE product_id = $1 AND action = 'admit_denied'", product_id)
        assert 1 <= len(rows) <= 2  # one per minute (a minute boundary may fall inside the loop)
        assert all(r["metadata"]["reason"] == "rate_limited" for r in rows)
        assert sum(r["metadata"]["count"] for r in rows) == 20
