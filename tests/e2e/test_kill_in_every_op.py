"""kill -9 of the orchestrator inside every lifecycle op converges.

For each op (start, stop, sleep, wake, rotate_key, destroy) and each point of the transition
executor (`claimed`: the intent is committed, nothing else done; `commit`: the backend call is
done, its outcome not yet recorded), a real `bap-engine serve` is started with
`BAP_CRASH_AT=<point>:<op>` and the op is triggered; the process SIGKILLs itself there. The
crashed servers leave twelve interrupted ops behind; one survivor then has to converge the
registry and the backend: no op left, no row stuck in a transitional state, every row's process
alive exactly when its state says so, no engine process without a row, every running engine
healthy and answering with the key its row holds.
"""

from __future__ import annotations

import hashlib
import os
import time

import asyncpg
import httpx
import pytest

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, wait_until
from tests.e2e.conftest import Server, StartServer
from tests.e2e.test_crash_safety import engine_pids

OPS = ["sleep", "wake", "start", "stop", "rotate_key", "destroy"]  # sleep first: its idle worker sleeps everything
POOL_OPS = ["pool_fill", "pool_claim"]  # the warm pool's worker booting one; a new user claiming one
POINTS = ["claimed", "commit"]


def _headers(key: str) -> dict[str, str]:
    return {"X-Platform-Key": key}


def _crashing(start_server: StartServer, monkeypatch: pytest.MonkeyPatch, point: str, op: str,
              ready: bool = True, **overrides: object) -> Server:
    monkeypatch.setenv("BAP_CRASH_AT", f"{point}:{op}")
    try:  # no repair by the crashing one
        return start_server(ready=ready, reconcile_interval_s=3600, **overrides)
    finally:
        monkeypatch.delenv("BAP_CRASH_AT")


def _call(server: Server, method: str, path: str, key: str, body: object = None) -> httpx.Response | None:
    try:
        return httpx.request(method, f"{server.url}{path}", headers=_headers(key), json=body, timeout=30)
    except httpx.HTTPError:
        return None  # the server died under the request: what we asked for


def _crashed(server: Server, timeout: float = 30) -> None:
    assert server.proc.wait(timeout) == -9, server.logs()[-2000:]


def _provision(server: Server, key: str, user: str) -> None:
    r = httpx.post(f"{server.url}/engines/{user}/admit", headers=_headers(key), json={"auto_provision": True},
                   timeout=30)
    assert r.status_code == 200 and r.json()["admitted"], r.text


def _interrupt(start_server: StartServer, monkeypatch: pytest.MonkeyPatch, key: str, point: str, op: str) -> None:
    user = f"{op}-{point}".replace("_", "-")
    if op == "sleep":
        server = _crashing(start_server, monkeypatch, point, op, idle_sleep_after_s=1, health_check_interval_s=1)
        _provision(server, key, user)
        _crashed(server)  # the idle worker put it to sleep and died there
        return
    server = _crashing(start_server, monkeypatch, point, op,
                       **({"idle_sleep_after_s": 1, "health_check_interval_s": 1} if op == "wake" else {}))
    _provision(server, key, user)
    if op == "wake":
        _wait_sleeping(server, key, user)
        _call(server, "POST", f"/engines/{user}/admit", key, {"auto_wake": True})
    elif op == "start":
        assert httpx.post(f"{server.url}/engines/{user}/stop", headers=_headers(key), timeout=30).status_code == 200
        _call(server, "POST", f"/engines/{user}/start", key)
    elif op == "destroy":
        _call(server, "DELETE", f"/engines/{user}", key)
    else:
        _call(server, "POST", f"/engines/{user}/{op.replace('_', '-')}", key)
    _crashed(server)


def _interrupt_pool(start_server: StartServer, monkeypatch: pytest.MonkeyPatch, key: str, point: str,
                    op: str) -> None:
    """The server's pool worker fills the pool (and dies there, for pool_fill); for pool_claim, a
    new user's admit claims the warm engine and the server dies there."""
    server = _crashing(start_server, monkeypatch, point, op, ready=op != "pool_fill")  # fills as it starts
    if op == "pool_claim":
        deadline = time.monotonic() + 30
        while httpx.get(f"{server.url}/status", headers=_headers(key)).json()["warm"] < 1:
            assert time.monotonic() < deadline, "the pool was not filled"
            time.sleep(0.1)
        _call(server, "POST", f"/engines/{op}-{point}".replace("_", "-") + "/admit", key, {"auto_provision": True})
    _crashed(server)


def _wait_sleeping(server: Server, key: str, user: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{server.url}/engines/{user}", headers=_headers(key)).json()["status"] != "sleeping":
        assert time.monotonic() < deadline, "the idle worker did not put the engine to sleep"
        time.sleep(0.2)


async def _converged(conn: asyncpg.Connection, settings: Settings) -> bool:
    rows = await conn.fetch("SELECT id::text, status, sleep_kind, op FROM engines WHERE deployment = $1",
                            settings.deployment)
    if any(r["op"] is not None or r["status"] in ("provisioning", "destroying") for r in rows):
        return False
    pids = engine_pids(settings)
    if not set(pids) <= {r["id"] for r in rows}:
        return False
    for r in rows:
        alive = r["id"] in pids
        if r["status"] == "running" and not alive or r["status"] == "stopped" and alive:
            return False
        if r["status"] == "sleeping" and r["sleep_kind"] == "paused" and not alive:
            return False
    return True


async def test_kill9_inside_every_op_converges(start_server: StartServer, settings: Settings, pg_dsn: str,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    first = start_server()
    r = httpx.post(f"{first.url}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                   json={"slug": f"kill-{os.urandom(5).hex()}", "display_name": "Kill"})
    key = str(r.json()["platform_api_key"])
    r = httpx.post(f"{first.url}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                   json={"slug": f"kill-pool-{os.urandom(5).hex()}", "display_name": "Kill pool"})
    pool_product, pool_key = str(r.json()["product_id"]), str(r.json()["platform_api_key"])
    first.proc.terminate()
    first.proc.wait(20)
    for op in OPS:
        for point in POINTS:
            _interrupt(start_server, monkeypatch, key, point, op)
    conn = await asyncpg.connect(pg_dsn)
    try:  # the pool is asked for only now, so the other ops' servers never filled it
        await conn.execute("UPDATE products SET policy = '{\"warm_pool\": 1}' WHERE id = $1", pool_product)
    finally:
        await conn.close()
    for op in POOL_OPS:
        for point in POINTS:
            _interrupt_pool(start_server, monkeypatch, pool_key, point, op)

    survivor = start_server(reconcile_interval_s=1, health_check_interval_s=1)
    conn = await asyncpg.connect(pg_dsn)
    try:
        await wait_until(lambda: _converged(conn, settings), timeout=90, interval=0.5)
        rows = await conn.fetch("SELECT user_id, status, api_key_hash, product_id::text AS product FROM engines "
                                "WHERE deployment = $1 AND NOT pool", settings.deployment)
    finally:
        await conn.close()
    by_user = {r["user_id"]: r for r in rows}
    assert "destroy-commit" not in by_user  # the destroy had begun: it was finished
    keys = {pool_product: pool_key}
    async with httpx.AsyncClient(base_url=survivor.url, timeout=10) as client:
        for user, row in by_user.items():
            got = (await client.get(f"/engines/{user}", headers=_headers(keys.get(row["product"], key)))).json()
            assert got["status"] == row["status"], (user, got)
            if row["status"] == "running":
                assert hashlib.sha256(got["api_key"].encode()).hexdigest() == row["api_key_hash"]
                h = await client.get(f"{got['url']}/history", headers={"X-Engine-Key": got["api_key"]})
                assert h.status_code == 200, (user, h.text)
