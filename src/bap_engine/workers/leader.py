"""Leader election: the workers run in exactly one replica at a time.

The leader holds a Postgres session advisory lock on its own connection. While it
holds it, it runs the worker loops in a TaskGroup and pings that connection; if the
connection drops the loops are cancelled. A dead leader's lock vanishes with its
session, and another replica takes over on its next try (every `retry_s`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg

from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle
from bap_engine.workers.base import Worker, run_loop
from bap_engine.workers.health import HealthWorker
from bap_engine.workers.idle import IdleWorker
from bap_engine.workers.reconcile import ReconcileWorker

__all__ = ["run_workers", "Leadership", "LEADER_LOCK"]

log = logging.getLogger("bap_engine.leader")
LEADER_LOCK = 7_415_005  # advisory lock class; the key is the deployment's hash


@dataclass
class Leadership:
    """Shared view of the election for metrics and tests."""

    is_leader: bool = False
    workers: dict[str, Worker] = field(default_factory=dict)
    terms: int = 0


def build_workers(lifecycle: Lifecycle, settings: Settings) -> list[Worker]:
    return [ReconcileWorker(lifecycle, settings), HealthWorker(lifecycle, settings), IdleWorker(lifecycle, settings)]


async def _lead(dsn: str, lifecycle: Lifecycle, settings: Settings, state: Leadership, stop: asyncio.Event) -> None:
    retry_s = max(0.2, min(2.0, settings.health_check_interval_s, settings.reconcile_interval_s))
    while not stop.is_set():
        try:
            conn = await asyncpg.connect(dsn)
        except (OSError, asyncpg.PostgresError):
            await _wait(stop, retry_s)
            continue
        try:
            # one leader per deployment
            if await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", LEADER_LOCK, settings.deployment):
                await _serve_term(conn, lifecycle, settings, state, stop, retry_s)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as err:
            log.warning("leadership lost", extra={"error": type(err).__name__})
        finally:
            state.is_leader = False
            await conn.close()
        await _wait(stop, retry_s)


async def _serve_term(conn: asyncpg.Connection, lifecycle: Lifecycle, settings: Settings, state: Leadership,
                      stop: asyncio.Event, retry_s: float) -> None:
    state.is_leader, state.terms = True, state.terms + 1
    workers = build_workers(lifecycle, settings)
    state.workers = {w.name: w for w in workers}
    log.info("elected leader: running workers", extra={"workers": [w.name for w in workers]})
    term_over = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        for w in workers:
            tg.create_task(run_loop(w, term_over), name=f"worker-{w.name}")
        try:
            while not stop.is_set():
                await _wait(stop, retry_s)
                await conn.fetchval("SELECT 1")  # the lock lives as long as this session
        finally:
            term_over.set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


@contextlib.asynccontextmanager
async def run_workers(dsn: str, lifecycle: Lifecycle, settings: Settings) -> AsyncIterator[Leadership]:
    """Take part in the election for the lifetime of the context."""
    state = Leadership()
    if not settings.workers_enabled:
        yield state
        return
    stop = asyncio.Event()
    task = asyncio.create_task(_lead(dsn, lifecycle, settings, state, stop), name="leader-election")
    try:
        yield state
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 15)
        except TimeoutError:
            task.cancel()
