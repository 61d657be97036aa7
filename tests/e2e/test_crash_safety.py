"""kill -9 of the orchestrator mid-provision, and several replicas on one database."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import asyncpg
import httpx

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, wait_until
from tests.e2e.conftest import StartServer
from tests.workers.conftest import alive


def register(url: str, policy: dict[str, object] | None = None) -> str:
    r = httpx.post(f"{url}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                   json={"slug": f"e2e-{os.urandom(6).hex()}", "display_name": "E2E", "policy": policy or {}})
    assert r.status_code == 200, r.text
    return str(r.json()["platform_api_key"])


def engine_pids(settings: Settings) -> dict[str, int]:
    """engine id → live pid, from the subprocess backend's records."""
    out: dict[str, int] = {}
    root = settings.data_dir / "engines"
    for record in root.glob("*/.bap-process.json") if root.exists() else []:
        pid = json.loads(record.read_text()).get("pid")
        if pid and alive(int(pid)):
            out[record.parent.name] = int(pid)
    return out


async def test_kill9_during_provisions_converges(start_server: StartServer, settings: Settings, pg_dsn: str) -> None:
    server = start_server(reconcile_interval_s=1, workers_enabled="false")
    key = register(server.url)

    async def admit(user: str) -> None:
        async with httpx.AsyncClient(timeout=30) as c:
            try:
                await c.post(f"{server.url}/engines/{user}/admit", json={"auto_provision": True},
                             headers={"X-Platform-Key": key})
            except httpx.HTTPError:
                pass  # the server dies under us

    users = [f"u{i}" for i in range(10)]
    tasks = [asyncio.create_task(admit(u)) for u in users]
    await asyncio.sleep(0.4)  # some rows inserted, some engines spawned, none finished
    server.kill9()
    await asyncio.gather(*tasks)

    survivor = start_server(reconcile_interval_s=1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        async def converged() -> bool:
            stuck = await conn.fetchval(
                "SELECT count(*) FROM engines WHERE port BETWEEN $1 AND $2 AND (status IN "
                "('provisioning', 'destroying') OR op IS NOT NULL)", settings.port_min, settings.port_max)
            return bool(stuck == 0)

        await wait_until(converged, timeout=60, interval=0.5)
        rows = {r["id"]: r for r in await conn.fetch(
            "SELECT id::text, user_id, status FROM engines WHERE port BETWEEN $1 AND $2",
            settings.port_min, settings.port_max)}
        processes = engine_pids(settings)
        assert set(processes) <= set(rows), "an engine process has no row"
        for row in rows.values():
            assert row["status"] == "running" and row["id"] in processes, dict(row)
        assert len({r["user_id"] for r in rows.values()}) == len(rows)
    finally:
        await conn.close()
    async with httpx.AsyncClient(timeout=30) as c:
        for user in users:
            await c.delete(f"{survivor.url}/engines/{user}", headers={"X-Platform-Key": key})


def _leaders(servers: list[object]) -> list[object]:
    return [s for s in servers if "elected leader" in s.logs()]  # type: ignore[attr-defined]


async def test_replicas_share_leadership_and_rate_limit(start_server: StartServer, settings: Settings,
                                                        pg_dsn: str) -> None:
    tuning = {"health_check_interval_s": 0.5, "reconcile_interval_s": 1, "health_max_failures": 1,
              "restart_backoff_base_s": 0.1}
    a, b = start_server(**tuning), start_server(**tuning)
    await wait_until(lambda: len(_leaders([a, b])) == 1, timeout=20)
    key = register(a.url, {"rate_limit_rpm": 10})

    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"{a.url}/engines/shared/admit", json={"auto_provision": True},
                         headers={"X-Platform-Key": key})
        assert r.json()["admitted"], r.text
        engine_id = r.json()["engine"]["engine_id"]
        results = []
        for i in range(30):  # 1 admit already spent; the two replicas together admit at most 9 more
            r = await c.post(f"{(a, b)[i % 2].url}/engines/shared/admit", headers={"X-Platform-Key": key})
            results.append(r.status_code)
        assert results.count(200) == 9 and results.count(429) == 21, results

        # one failure → exactly one restart, whichever replica leads
        pid = engine_pids(settings)[engine_id]
        os.kill(pid, signal.SIGKILL)
        conn = await asyncpg.connect(pg_dsn)
        try:
            async def restarted() -> bool:
                n = await conn.fetchval("SELECT count(*) FROM audit_log WHERE engine_id = $1 "
                                        "AND action = 'auto_restart_success'", engine_id)
                return bool(n >= 1)

            await wait_until(restarted, timeout=30, interval=0.2)
            await asyncio.sleep(2)  # give a second (wrong) restart the chance to happen
            starts = await conn.fetchval("SELECT count(*) FROM audit_log WHERE engine_id = $1 "
                                         "AND action = 'auto_restart_start'", engine_id)
            assert starts == 1
        finally:
            await conn.close()

        leader = _leaders([a, b])[0]
        follower = b if leader is a else a
        started = time.monotonic()
        leader.kill9()  # type: ignore[attr-defined]
        await wait_until(lambda: "elected leader" in follower.logs(), timeout=10)
        assert time.monotonic() - started < 10
        await c.delete(f"{follower.url}/engines/shared", headers={"X-Platform-Key": key})
