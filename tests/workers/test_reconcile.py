"""Reconciliation: orphans removed, abandoned ops finished or undone, drift corrected."""

from __future__ import annotations

import json
import os
import signal
import uuid
from datetime import timedelta

import asyncpg
import httpx

from bap_engine.backends.base import LABEL_DEPLOYMENT, LABEL_ENGINE_ID, LABEL_PRODUCT_ID, EngineSpec
from bap_engine.config import Settings
from bap_engine.lifecycle import now
from bap_engine.registry import EngineRow, get_engine_by_id
from bap_engine.workers.reconcile import ReconcileWorker
from tests.conftest import pk, register_product, wait_until
from tests.workers.conftest import AppFactory, alive, engine_pid, lifecycle_of


async def _reconcile_actions(dsn: str) -> list[dict[str, object]]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT metadata::text AS m FROM audit_log WHERE action = 'reconcile' ORDER BY id")
        return [json.loads(r["m"]) for r in rows]
    finally:
        await conn.close()


async def test_orphan_engine_is_removed_after_grace(make_app: AppFactory, settings: Settings) -> None:
    async with make_app() as (app, client):
        lc = lifecycle_of(app)
        orphan = str(uuid.uuid4())
        spec = EngineSpec(engine_id=orphan, product_id=str(uuid.uuid4()), port=settings.port_max, image="x",
                          env={"ENGINE_API_KEY": "sk-sept-test"},
                          labels={LABEL_ENGINE_ID: orphan, LABEL_PRODUCT_ID: "p",
                                  LABEL_DEPLOYMENT: settings.deployment})
        await lc.backend.create(spec)
        worker = ReconcileWorker(lc, app.state.settings)
        assert await worker.run_once() == 0  # young: maybe a provision in flight
        later = ReconcileWorker(lc, app.state.settings, clock=lambda: now() + timedelta(seconds=600))
        assert await later.run_once() == 1
        assert (await lc.backend.inspect(orphan)).state == "absent"


async def test_abandoned_ops_and_drift(make_app: AppFactory, settings: Settings, pg_dsn: str) -> None:
    async with make_app() as (app, client):
        product_id, key = await register_product(client)
        for user in ("a", "b", "c"):
            r = await client.post(f"/engines/{user}/admit", json={"auto_provision": True}, headers=pk(key))
            assert r.json()["admitted"], r.text
        rows = {u: (await client.get(f"/engines/{u}", headers=pk(key))).json() for u in ("a", "b", "c")}
        dead_owner = 2**31 - 7  # no process holds this owner lock
        conn = await asyncpg.connect(pg_dsn)
        try:  # a: crashed mid-provision (engine up); b: crashed mid-destroy
            await conn.execute("UPDATE engines SET status='provisioning', op='provision', op_owner=$2, "
                               "op_deadline=now() + interval '1 hour' WHERE id=$1", rows["a"]["engine_id"], dead_owner)
            await conn.execute("UPDATE engines SET status='destroying', op='destroy', op_owner=$2, "
                               "op_deadline=now() + interval '1 hour' WHERE id=$1", rows["b"]["engine_id"], dead_owner)
        finally:
            await conn.close()
        pid_c = engine_pid(settings, rows["c"]["engine_id"])
        os.kill(pid_c, signal.SIGKILL)  # c: vanished behind our back
        await wait_until(lambda: not alive(pid_c), timeout=5)
        worker = ReconcileWorker(lifecycle_of(app), app.state.settings)
        assert await worker.run_once() == 3
        assert (await client.get("/engines/a", headers=pk(key))).json()["status"] == "running"
        assert (await client.get("/engines/b", headers=pk(key))).status_code == 404
        assert (await client.get("/engines/c", headers=pk(key))).json()["status"] == "failed"
        assert not alive(pid_c)
        assert await worker.run_once() == 0  # idempotent
        found = [str(m.get("found")) for m in await _reconcile_actions(pg_dsn)]
        assert any("provisioning" in f for f in found) and any("destroying" in f for f in found)
        for user in ("a", "c"):
            assert (await client.delete(f"/engines/{user}", headers=pk(key))).status_code == 200


async def test_rotation_interrupted_by_a_crash_is_completed(make_app: AppFactory, pg_dsn: str) -> None:
    async with make_app() as (app, client):
        _, key = await register_product(client)
        r = await client.post("/engines/rot/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        lc = lifecycle_of(app)
        new_key = "sk-sept-" + uuid.uuid4().hex
        dead_owner = 2**31 - 9
        conn = await asyncpg.connect(pg_dsn)
        try:  # the orchestrator recorded the new key, told the engine, and died before storing it
            await conn.execute("UPDATE engines SET pending_key_enc=$2, op='rotate_key', op_owner=$3, "
                               "op_deadline=now() + interval '1 hour' WHERE id=$1",
                               engine["engine_id"], lc.sealer.seal(new_key), dead_owner)
        finally:
            await conn.close()
        claim = await lc.tx.claim(engine["engine_id"], "test")
        assert claim is not None
        assert await lc.push_key(claim.row, engine["api_key"], new_key) == 200
        await _abandon(pg_dsn, engine["engine_id"], dead_owner)
        assert await ReconcileWorker(lc, app.state.settings).run_once() == 1
        r = await client.get("/engines/rot", headers=pk(key))
        assert r.json()["api_key"] == new_key
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"{engine['url']}/history", headers={"X-Engine-Key": new_key})).status_code == 200
        assert (await client.delete("/engines/rot", headers=pk(key))).status_code == 200


async def _row(lc: object, engine_id: str) -> EngineRow:
    async with lc.pool.acquire() as conn:  # type: ignore[attr-defined]
        row = await get_engine_by_id(conn, engine_id)
    assert row is not None
    return row


async def _abandon(dsn: str, engine_id: str, owner: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE engines SET op='rotate_key', op_owner=$2 WHERE id=$1", engine_id, owner)
    finally:
        await conn.close()


async def test_stop_interrupted_by_a_crash_is_completed(make_app: AppFactory, settings: Settings, pg_dsn: str) -> None:
    async with make_app() as (app, client):
        _, key = await register_product(client)
        r = await client.post("/engines/halt/admit", json={"auto_provision": True}, headers=pk(key))
        engine_id = r.json()["engine"]["engine_id"]
        pid = engine_pid(settings, engine_id)
        await _abandon_op(pg_dsn, engine_id, "stop", 2**31 - 11)  # died right after claiming the stop
        assert await ReconcileWorker(lifecycle_of(app), app.state.settings).run_once() == 1
        assert (await client.get("/engines/halt", headers=pk(key))).json()["status"] == "stopped"
        await wait_until(lambda: not alive(pid), timeout=10)
        assert (await client.delete("/engines/halt", headers=pk(key))).status_code == 200


async def _abandon_op(dsn: str, engine_id: str, op: str, owner: int) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("UPDATE engines SET op=$2, op_owner=$3, op_deadline=now() + interval '1 hour' WHERE id=$1",
                           engine_id, op, owner)
    finally:
        await conn.close()
