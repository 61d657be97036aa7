"""Supervision: the workers survive losing Postgres, and then still heal a crashed engine.

One `bap-engine serve` on the fault Postgres with short intervals. (1) Postgres is stopped for
~6 s and started again; (2) the leader's database session is killed with pg_terminate_backend.
After each, the server's /health must come back to 200 by itself, a leader must hold the lock
again, and an engine killed with SIGKILL must be restarted by the health worker (auto_restart_success,
GET running, its /health answering); `bap_task_restarts_total{task=...}` must be exposed.

Without a supervisor, the leader-election task dies with the first database error of a term (the
error escapes the TaskGroup as an ExceptionGroup), so these tests fail at "a leader again".
"""

from __future__ import annotations

import asyncio
import os
import re
import signal

import asyncpg

from bap_engine.config import Settings
from bap_engine.workers.leader import LEADER_LOCK
from tests.backends.helpers import health_ok
from tests.conftest import wait_until
from tests.e2e.conftest import Server, StartServer
from tests.faults.pgctl import FaultPostgres
from tests.faults.support import Api, audit_count, engine_pids, prometheus_text, register, unique_user
from tests.workers.conftest import alive

TUNING: dict[str, object] = {
    "health_check_interval_s": 1, "reconcile_interval_s": 2, "restart_backoff_base_s": 1,
    "health_max_failures": 2, "health_check_timeout_s": 1,
}
OUTAGE_S = 6  # how long Postgres stays down: the fault itself, not a wait for an effect
_LEADER_PIDS = ("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1 "
                "AND objid = hashtext($2)::oid AND objsubid = 2")


def _diagnosis(server: Server) -> str:
    lines = [ln for ln in server.logs().splitlines() if re.search(r"leader|supervis|task failed|Error", ln)]
    return "server log (leadership / task lines):\n" + "\n".join(lines[-15:])


async def _leader_pids(dsn: str, deployment: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return [int(r["pid"]) for r in await conn.fetch(_LEADER_PIDS, LEADER_LOCK, deployment)]
    finally:
        await conn.close()


async def _await(what: str, server: Server, predicate: object, timeout: float) -> None:
    """wait_until with the server's leadership log lines in the failure message."""
    try:
        await wait_until(predicate, timeout=timeout, interval=0.2)  # type: ignore[arg-type]
    except AssertionError:
        raise AssertionError(f"{what}: not within {timeout} s\n{_diagnosis(server)}") from None


async def _has_leader(dsn: str, deployment: str) -> bool:
    return len(await _leader_pids(dsn, deployment)) == 1


async def _assert_heals_a_killed_engine(server: Server, api: Api, settings: Settings, dsn: str,
                                        engine: dict[str, object]) -> None:
    engine_id = str(engine["engine_id"])
    old_pid = engine_pids(settings)[engine_id]
    os.kill(old_pid, signal.SIGKILL)

    async def restarted() -> bool:
        return await audit_count(dsn, engine_id, "auto_restart_success") >= 1

    await _await("auto_restart_success after SIGKILL of the engine", server, restarted, 30)
    async with api.client() as c:
        got = await api.call(c, "get", str(engine["user_id"]))
    assert got.status == 200 and got.doc["status"] == "running", got.body
    assert await health_ok(str(got.doc["url"]), timeout=3), "the restarted engine's /health does not answer"
    new_pid = engine_pids(settings).get(engine_id)
    assert new_pid is not None and new_pid != old_pid and not alive(old_pid)


async def _assert_task_restarts_metric(url: str) -> None:
    status, text = await prometheus_text(url)
    assert status == 200, text[:300]
    assert "# TYPE bap_task_restarts_total counter" in text, "bap_task_restarts_total is not exposed"
    samples = [ln for ln in text.splitlines() if ln.startswith("bap_task_restarts_total{")]
    assert samples and all('task="' in ln for ln in samples), samples


async def test_heals_after_postgres_restart(start_server: StartServer, settings: Settings, fault_pg: FaultPostgres,
                                            pg_dsn: str) -> None:
    server = start_server(**TUNING)
    await _await("a leader at start", server, lambda: _has_leader(pg_dsn, settings.deployment), 20)
    api = Api(server.url, register(server.url))
    engine = await api.admitted(unique_user("sup"))

    async with fault_pg.down():
        await _await("/health not 200 while Postgres is down", server, lambda: _not_ok(api), 10)
        await asyncio.sleep(OUTAGE_S)

    await _await("/health back to 200 by itself", server, lambda: _ok(api), 20)
    await _await("a leader again after the restart", server, lambda: _has_leader(pg_dsn, settings.deployment), 20)
    await _assert_heals_a_killed_engine(server, api, settings, pg_dsn, engine)
    await _assert_task_restarts_metric(server.url)


async def test_heals_after_leader_session_terminated(start_server: StartServer, settings: Settings,
                                                     pg_dsn: str) -> None:
    server = start_server(**TUNING)
    await _await("a leader at start", server, lambda: _has_leader(pg_dsn, settings.deployment), 20)
    api = Api(server.url, register(server.url))
    engine = await api.admitted(unique_user("sup"))

    [victim] = await _leader_pids(pg_dsn, settings.deployment)
    conn = await asyncpg.connect(pg_dsn)
    try:
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", victim)
    finally:
        await conn.close()

    async def new_leader() -> bool:
        pids = await _leader_pids(pg_dsn, settings.deployment)
        return len(pids) == 1 and pids[0] != victim

    await _await("a leader again after its session was terminated", server, new_leader, 20)
    assert await api.health() == 200
    await _assert_heals_a_killed_engine(server, api, settings, pg_dsn, engine)
    await _assert_task_restarts_metric(server.url)


async def _ok(api: Api) -> bool:
    return await api.health() == 200


async def _not_ok(api: Api) -> bool:
    return await api.health() != 200
