"""A hung engine (accepts connections, never answers, ignores SIGTERM) is failed and replaced,
while the admits of the other engines keep answering fast.

The engines run tests/faults/hang_engine.py: the reference engine, which on SIGUSR1 blocks its
event loop and ignores SIGTERM (see that file for why not SIGSTOP). The health worker must mark it
failed (health_failed) and restart it (auto_restart_success): a new process, healthy, with the same
data (/history keeps the turn made before the hang). Meanwhile admits of two other engines are
timed; p99 < ADMIT_P99_S is a hang-isolation check (nothing waits on the hung engine), not a
benchmark, hence the generous bound.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from pathlib import Path

import httpx

from bap_engine.config import Settings
from tests.backends.helpers import execute, health_ok, history
from tests.conftest import wait_until
from tests.e2e.conftest import StartServer
from tests.faults.support import Api, audit_count, engine_pids, register, unique_user
from tests.workers.conftest import alive

HANG_ENGINE = Path(__file__).with_name("hang_engine.py")
TUNING: dict[str, object] = {
    "health_check_interval_s": 1, "reconcile_interval_s": 2, "restart_backoff_base_s": 1,
    "health_max_failures": 2, "health_check_timeout_s": 1, "engine_command": f"{sys.executable} {HANG_ENGINE}",
}
ADMIT_P99_S = 1.0
MAX_ADMITS = 2000
PACE_S = 0.02


async def _does_not_answer(url: str) -> bool:
    """The port accepts a TCP connection, but GET /health gets no answer within 1 s."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=2):
        pass
    try:
        async with httpx.AsyncClient(timeout=1) as c:
            await c.get(f"{url}/health")
    except httpx.TimeoutException:
        return True
    return False


async def _admit_loop(api: Api, users: list[str], latencies: list[float], stop: asyncio.Event) -> None:
    async with api.client() as c:
        for i in range(MAX_ADMITS):
            if stop.is_set():
                return
            call = await api.call(c, "admit", users[i % len(users)])
            assert call.status == 200 and call.doc.get("admitted") is True, (call.status, call.body)
            latencies.append(call.seconds)
            await asyncio.sleep(PACE_S)


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


async def test_hung_engine_is_replaced_while_others_stay_fast(start_server: StartServer, settings: Settings,
                                                              pg_dsn: str) -> None:
    server = start_server(**TUNING)
    api = Api(server.url, register(server.url))
    hung = await api.admitted(unique_user("hung"))
    others = [str((await api.admitted(unique_user("other")))["user_id"]) for _ in range(2)]
    engine_id, url, key = str(hung["engine_id"]), str(hung["url"]), str(hung["api_key"])
    status, events = await execute(url, key, "a turn before the hang")
    assert status == 200 and events
    before = await history(url, key)
    assert before

    old_pid = engine_pids(settings)[engine_id]
    os.kill(old_pid, signal.SIGUSR1)
    await wait_until(lambda: _does_not_answer(url), timeout=5, interval=0.2)

    async def replaced() -> bool:
        pid = engine_pids(settings).get(engine_id)
        return pid is not None and pid != old_pid and await health_ok(url, 1)

    latencies: list[float] = []
    stop = asyncio.Event()
    admits = asyncio.create_task(_admit_loop(api, others, latencies, stop))
    started = time.monotonic()
    try:
        await wait_until(replaced, timeout=40, interval=0.2)
    finally:
        stop.set()
        await admits
    assert await audit_count(pg_dsn, engine_id, "health_failed") >= 1
    await wait_until(lambda: _count_at_least(pg_dsn, engine_id, "auto_restart_success"), timeout=10)
    assert not alive(old_pid), "the hung process was not killed"
    async with api.client() as c:
        got = await api.call(c, "get", str(hung["user_id"]))
    assert got.status == 200 and got.doc["status"] == "running", got.body
    assert (await history(url, key))[: len(before)] == before, "the restarted engine lost its data"

    assert len(latencies) >= 20, f"only {len(latencies)} admits in {time.monotonic() - started:.1f} s"
    assert _p99(latencies) < ADMIT_P99_S, f"admit p99 {_p99(latencies):.3f} s (max {max(latencies):.3f} s)"


async def _count_at_least(dsn: str, engine_id: str, action: str) -> bool:
    return await audit_count(dsn, engine_id, action) >= 1
