"""POST /engines/{user_id}/upgrade on real subprocess engines: the runtime replaced by another version
with data, key, URL and id kept; a version that never gets healthy rolled back; a stopped engine
upgraded in place; an upgrade cut short finished or rolled back by the reconciler."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import Settings
from bap_engine.registry import get_engine_by_id
from bap_engine.workers.reconcile import ReconcileWorker
from tests.conftest import assert_envelope, engine_dir, pk, pool_of, register_product
from tests.workers.conftest import AppFactory, alive, engine_pid, lifecycle_of


def marked_engine(version: str) -> str:
    """The reference engine, through `sh` appending `version` to `ran-version` in its data directory."""
    script = f'echo {version} >> ran-version; exec "$0" -m bap_engine.refengine'
    return shlex.join(("sh", "-c", script, sys.executable))


VERSIONS = {"v1": marked_engine("v1"), "v2": marked_engine("v2"), "broken": shlex.join(("sh", "-c", "exit 1"))}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"engine_commands": VERSIONS, "boot_timeout_s": 20.0, "stop_grace_s": 2.0})


def ran(settings: Settings, engine_id: str) -> list[str]:
    path = engine_dir(settings, engine_id) / "ran-version"
    return path.read_text().split() if path.exists() else []


async def _provision(client: httpx.AsyncClient, key: str, user: str, version: str = "v1") -> dict[str, Any]:
    r = await client.post("/engines/provision", json={"user_id": user, "engine_version": version}, headers=pk(key))
    assert r.status_code == 200, r.text
    doc = (await client.get(f"/engines/{user}", headers=pk(key))).json()
    assert isinstance(doc, dict)
    return doc


async def _talk(engine: dict[str, Any]) -> list[object]:
    """One turn on the engine, then its history."""
    headers = {"X-Engine-Key": engine["api_key"]}
    async with httpx.AsyncClient(base_url=engine["url"], timeout=10) as c:
        assert (await c.post("/execute", json={"message": "remember me"}, headers=headers)).status_code == 200
        return await _history(engine)


async def _history(engine: dict[str, Any]) -> list[object]:
    async with httpx.AsyncClient(base_url=engine["url"], timeout=10) as c:
        r = await c.get("/history", headers={"X-Engine-Key": engine["api_key"]})
    assert r.status_code == 200, r.text
    messages = r.json()["messages"]
    assert isinstance(messages, list)
    return messages


async def _upgrade_audits(app: FastAPI, engine_id: str) -> list[dict[str, Any]]:
    rows = await pool_of(app).fetch("SELECT metadata::text AS m FROM audit_log WHERE engine_id = $1 "
                                    "AND action = 'upgrade' ORDER BY id", engine_id)
    return [json.loads(r["m"]) for r in rows]


async def _abandon(dsn: str, engine_id: str, sql: str, *args: object) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f"UPDATE engines SET {sql}, op='upgrade', op_owner={2**31 - 11}, "
                           "op_deadline=now() + interval '1 hour' WHERE id=$1", engine_id, *args)
    finally:
        await conn.close()


async def test_upgrade_keeps_data_key_and_url(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    _, key = await register_product(client)
    before = await _provision(client, key, "u")
    history = await _talk(before)
    assert history
    r = await client.post("/engines/u/upgrade", json={"engine_version": "v2"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert r.json() == {"engine_id": before["engine_id"], "user_id": "u", "status": "running",
                        "url": before["url"], "engine_version": "v2", "outcome": "upgraded"}
    after = (await client.get("/engines/u", headers=pk(key))).json()
    assert (after["engine_id"], after["url"], after["api_key"]) == (before["engine_id"], before["url"],
                                                                    before["api_key"])
    assert after["engine_version"] == "v2" and after["status"] == "running"
    assert ran(settings, before["engine_id"]) == ["v1", "v2"]  # v2's command runs now
    assert await _history(after) == history
    audits = await _upgrade_audits(app, before["engine_id"])
    assert [(a["from"], a["to"], a["outcome"]) for a in audits] == [("v1", "v2", "upgraded")]
    # the version it runs already: nothing touched
    r = await client.post("/engines/u/upgrade", json={"engine_version": "v2"}, headers=pk(key))
    assert r.status_code == 200 and r.json()["outcome"] == "upgraded", r.text
    assert ran(settings, before["engine_id"]) == ["v1", "v2"]
    assert len(await _upgrade_audits(app, before["engine_id"])) == 1
    assert (await client.delete("/engines/u", headers=pk(key))).status_code == 200


async def test_a_version_that_never_gets_healthy_is_rolled_back(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings
) -> None:
    _, key = await register_product(client)
    before = await _provision(client, key, "b")
    history = await _talk(before)
    r = await client.post("/engines/b/upgrade", json={"engine_version": "broken"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert r.json()["outcome"] == "rolled_back" and r.json()["engine_version"] == "v1"
    after = (await client.get("/engines/b", headers=pk(key))).json()
    assert (after["engine_version"], after["status"], after["url"]) == ("v1", "running", before["url"])
    assert ran(settings, before["engine_id"]) == ["v1", "v1"]
    assert await _history(after) == history
    audits = await _upgrade_audits(app, before["engine_id"])
    assert [(a["from"], a["to"], a["outcome"]) for a in audits] == [("v1", "broken", "rolled_back")]
    assert audits[0]["error"] == "BACKEND_ERROR"
    upgrade_to = await pool_of(app).fetchval("SELECT upgrade_to FROM engines WHERE id = $1", before["engine_id"])
    assert upgrade_to is None
    assert (await client.delete("/engines/b", headers=pk(key))).status_code == 200


async def test_a_stopped_engine_stays_stopped_and_starts_on_the_new_version(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    _, key = await register_product(client)
    before = await _provision(client, key, "s")
    history = await _talk(before)
    pid = engine_pid(settings, before["engine_id"])
    assert (await client.post("/engines/s/stop", headers=pk(key))).status_code == 200
    assert not alive(pid)
    r = await client.post("/engines/s/upgrade", json={"engine_version": "v2"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["engine_version"], r.json()["outcome"]) == ("stopped", "v2", "upgraded")
    record = json.loads((engine_dir(settings, before["engine_id"]) / ".bap-process.json").read_text())
    assert record["pid"] is None  # stopped again
    assert (await client.post("/engines/s/start", headers=pk(key))).status_code == 200
    assert ran(settings, before["engine_id"])[-1] == "v2"
    after = (await client.get("/engines/s", headers=pk(key))).json()
    assert (after["status"], after["engine_version"], after["url"]) == ("running", "v2", before["url"])
    assert await _history(after) == history
    assert (await client.delete("/engines/s", headers=pk(key))).status_code == 200


async def test_refusals_change_nothing(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client)
    before = await _provision(client, key, "r")
    pool = pool_of(app)

    async def state() -> tuple[object, ...]:
        row = await pool.fetchrow("SELECT status, engine_version, url, ref, upgrade_to, op FROM engines "
                                  "WHERE id = $1", before["engine_id"])
        audits = await pool.fetchval("SELECT count(*) FROM audit_log WHERE product_id = $1", product_id)
        return (*tuple(row), audits, tuple(ran(settings, before["engine_id"])))

    snapshot = await state()
    r = await client.post("/engines/r/upgrade", json={"engine_version": "v9"}, headers=pk(key))
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert "v9" in r.json()["error"]["message"]
    assert await state() == snapshot
    assert_envelope(await client.post("/engines/nobody/upgrade", json={"engine_version": "v2"}, headers=pk(key)),
                    404, "ENGINE_NOT_FOUND")
    assert_envelope(await client.post("/engines/r/upgrade", json={"engine_version": 2}, headers=pk(key)),
                    400, "VALIDATION_ERROR")
    lc = lifecycle_of(app)
    claim = await lc.tx.claim(before["engine_id"], "stop")  # another transition holds the engine
    assert claim is not None
    async with claim:
        r = await client.post("/engines/r/upgrade", json={"engine_version": "v2"}, headers=pk(key))
        assert_envelope(r, 409, "ENGINE_BUSY")
    assert await state() == snapshot
    await pool.execute("UPDATE engines SET status = 'failed' WHERE id = $1", before["engine_id"])
    r = await client.post("/engines/r/upgrade", json={"engine_version": "v2"}, headers=pk(key))
    assert_envelope(r, 409, "ENGINE_NOT_RUNNING")
    assert (await client.delete("/engines/r", headers=pk(key))).status_code == 200


async def test_an_abandoned_upgrade_is_finished_or_rolled_back(
    make_app: AppFactory, settings: Settings, pg_dsn: str
) -> None:
    async with make_app() as (app, client):
        _, key = await register_product(client)
        # done: the engine already answers on v2, the orchestrator died before committing it
        done = await _provision(client, key, "done", "v2")
        await _abandon(pg_dsn, done["engine_id"], "engine_version='v1', upgrade_to='v2'")
        # cut: the intent was recorded, the engine still runs v1
        cut = await _provision(client, key, "cut", "v1")
        history = await _talk(cut)
        await _abandon(pg_dsn, cut["engine_id"], "upgrade_to='v2'")
        worker = ReconcileWorker(lifecycle_of(app), app.state.settings)
        assert await worker.run_once() == 2
        pool = pool_of(app)
        for engine, version in ((done, "v2"), (cut, "v1")):
            row = await pool.fetchrow("SELECT status, engine_version, upgrade_to, op FROM engines WHERE id = $1",
                                      engine["engine_id"])
            assert tuple(row) == ("running", version, None, None)
        assert ran(settings, done["engine_id"]) == ["v2"]  # kept as it was
        assert ran(settings, cut["engine_id"]) == ["v1", "v1"]  # re-created on its previous version
        assert await _history(cut) == history
        outcomes = [a["outcome"] for e in (done, cut) for a in await _upgrade_audits(app, e["engine_id"])]
        assert outcomes == ["upgraded", "rolled_back"]
        assert await worker.run_once() == 0  # idempotent
        for user in ("done", "cut"):
            assert (await client.delete(f"/engines/{user}", headers=pk(key))).status_code == 200


async def test_a_paused_sleeper_stays_asleep_and_wakes_on_the_new_version(
    make_app: AppFactory, settings: Settings
) -> None:
    async with make_app(sleep_mode="pause") as (app, client):
        _, key = await register_product(client)
        before = await _provision(client, key, "z")
        lc = lifecycle_of(app)
        async with lc.pool.acquire() as conn:
            row = await get_engine_by_id(conn, before["engine_id"])
        assert row is not None and await lc.sleep(row, idle_s=1)
        r = await client.post("/engines/z/upgrade", json={"engine_version": "v2"}, headers=pk(key))
        assert r.status_code == 200, r.text
        assert (r.json()["status"], r.json()["engine_version"]) == ("sleeping", "v2")
        kind = await pool_of(app).fetchval("SELECT sleep_kind FROM engines WHERE id = $1", before["engine_id"])
        assert kind == "stopped"
        r = await client.post("/engines/z/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.status_code == 200 and r.json()["admitted"], r.text
        assert r.json()["engine"]["engine_version"] == "v2" and r.json()["engine"]["status"] == "running"
        assert ran(settings, before["engine_id"])[-1] == "v2"
        assert (await client.delete("/engines/z", headers=pk(key))).status_code == 200
