"""Audit trail: admission denials are coalesced per (product, reason, minute); no key is ever audited.

The transitions' own rows (provision, rotate_key, stop, start, destroy, policy_*) are checked in
order in test_walkthrough; provision_failed in test_errors.
"""

from __future__ import annotations

import shlex
import sys
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, assert_envelope, audit_rows_containing, pk, pool_of, register_product, services_of

REFENGINE = shlex.join((sys.executable, "-m", "bap_engine.refengine"))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, knowing engine version 'pinned-1' too (an unknown version is refused)."""
    return settings.model_copy(update={"engine_commands": {"pinned-1": REFENGINE}})



def _minute() -> datetime:
    return datetime.now(UTC).replace(second=0, microsecond=0)


async def test_admit_denied_is_coalesced(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key = await register_product(client)
    before = _minute()
    for _ in range(30):
        r = await client.post("/engines/nobody/admit", headers=pk(key))
        assert r.json()["reason"] == "engine_not_found"
    after = _minute()
    await services_of(app).discovery.flush()
    rows = await pool_of(app).fetch(
        "SELECT timestamp, actor, user_id, metadata FROM audit_log WHERE product_id = $1 AND action = 'admit_denied' "
        "ORDER BY timestamp", product_id)
    if before == after:
        assert len(rows) == 1
        assert rows[0]["timestamp"] == before
        assert rows[0]["metadata"] == {"reason": "engine_not_found", "count": 30}
    else:  # the loop straddled a minute boundary: one row per minute, 30 in all
        assert len(rows) == 2 and sum(r["metadata"]["count"] for r in rows) == 30
    # a second batch in the same minute adds to the same row
    await client.post("/engines/nobody/admit", headers=pk(key))
    await services_of(app).discovery.flush()
    total = await pool_of(app).fetchval(
        "SELECT sum((metadata->>'count')::int) FROM audit_log WHERE product_id = $1 AND action = 'admit_denied'",
        product_id)
    assert total == 31


async def test_admit_denied_reasons_are_kept_apart(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client, policy={"max_engines": 0})
    for _ in range(3):
        await client.post("/engines/x/admit", headers=pk(key))
    for _ in range(2):
        assert_envelope(await client.post("/engines/x/admit", json={"auto_provision": True}, headers=pk(key)), 429,
                        "QUOTA_EXCEEDED")
    await services_of(app).discovery.flush()
    rows = await pool_of(app).fetch(
        "SELECT metadata->>'reason' AS reason, sum((metadata->>'count')::int) AS n FROM audit_log "
        "WHERE product_id = $1 AND action = 'admit_denied' GROUP BY 1 ORDER BY 1", product_id)
    assert [(r["reason"], r["n"]) for r in rows] == [("engine_not_found", 3), ("quota_exceeded", 2)]


async def test_no_key_reaches_the_audit_log(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client, policy={"engine_version": "pinned-1"})
    r = await client.post("/engines/provision", json={"user_id": "audited"}, headers=pk(key))
    engine_key = r.json()["api_key"]
    r = await client.post("/engines/audited/rotate-key", headers=pk(key))
    new_key = r.json()["api_key"]
    await client.put(f"/products/{product_id}/policy", headers={"X-Admin-Key": ADMIN_KEY}, json={"policy": {}})
    await client.delete("/engines/audited", headers=pk(key))
    assert settings.master_key is not None
    secrets = [key, engine_key, new_key, ADMIN_KEY, settings.master_key]
    assert await audit_rows_containing(settings.database_url or "", secrets) == []
    actions = await pool_of(app).fetch("SELECT action, metadata FROM audit_log WHERE product_id = $1 ORDER BY id",
                                       product_id)
    assert [r["action"] for r in actions] == ["policy_register", "provision", "rotate_key", "policy_update",
                                              "destroy"]
    assert actions[1]["metadata"]["engine_version"] == "pinned-1"  # the product's pinned version was used
