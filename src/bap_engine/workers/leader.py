"""Leader election: the workers run in exactly one replica at a time.

The leader holds a Postgres session advisory lock on its own connection and pings it every
`retry_s`. While it holds the lock, each worker loop runs as its own supervised task; when the
ping fails (Postgres restarted, the session was terminated, the network dropped) the term ends:
the loops are stopped, the connection is dropped, and the lock is contested again on the next
try. Losing the database is a normal event here, logged once per term, never fatal. Anything
else escapes to the supervisor, which logs its traceback and runs the election again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle
from bap_engine.supervisor import Supervisor
from bap_engine.workers.base import Worker, run_loop
from bap_engine.workers.health import HealthWorker
from bap_engine.workers.idle import IdleWorker
from bap_engine.workers.reconcile import ReconcileWorker

__all__ = ["run_workers", "Leadership", "LEADER_LOCK", "DB_LOST", "WorkerFactory"]

log = logging.getLogger("bap_engine.leader")
LEADER_LOCK = 7_415_005  # advisory lock class; the key is the deployment's hash
# What losing the database looks like from asyncpg (TimeoutError: a ping that got no answer).
DB_LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


@dataclass
class Leadership:
    """Shared view of the election for metrics and tests."""

    is_leader: bool = False
    workers: dict[str, Worker] = field(default_factory=dict)
    terms: int = 0


# Builds a feature's worker for one term (the composition root passes the features' factories).
WorkerFactory = Callable[[], Worker]


def build_workers(lifecycle: Lifecycle, settings: Settings, supervisor: Supervisor,
                  more: Sequence[WorkerFactory] = ()) -> list[Worker]:
    return [ReconcileWorker(lifecycle, settings), HealthWorker(lifecycle, settings, supervisor=supervisor),
            IdleWorker(lifecycle, settings), *(make() for make in more)]


class Election:
    def __init__(self, dsn: str, lifecycle: Lifecycle, settings: Settings, supervisor: Supervisor,
                 more: Sequence[WorkerFactory] = ()) -> None:
        self.dsn, self.lc, self.s, self.sup = dsn, lifecycle, settings, supervisor
        self.more = list(more)
        self.state = Leadership()
        self.retry_s = max(0.2, min(2.0, settings.health_check_interval_s, settings.reconcile_interval_s))
        self._term_over = asyncio.Event()

    async def run(self) -> None:
        """Contest the lock forever (until cancelled)."""
        while True:
            try:
                conn = await asyncio.wait_for(asyncpg.connect(self.dsn), self.retry_s * 5)
            except DB_LOST:
                await asyncio.sleep(self.retry_s)
                continue
            try:
                await self._term(conn)
            except DB_LOST as err:
                if self.state.is_leader:
                    log.warning("leadership lost with the database connection", extra={"error": repr(err)})
            finally:
                await self._end_term()
                conn.terminate()
            await asyncio.sleep(self.retry_s)

    async def _term(self, conn: asyncpg.Connection) -> None:
        key = (LEADER_LOCK, self.s.deployment)  # one leader per deployment
        if not await conn.fetchval("SELECT pg_try_advisory_lock($1, hashtext($2))", *key):
            return
        state = self.state
        state.is_leader, state.terms = True, state.terms + 1
        workers = build_workers(self.lc, self.s, self.sup, self.more)
        state.workers = {w.name: w for w in workers}
        self._term_over = asyncio.Event()
        for w in workers:
            self._start_loop(w)
        log.info("elected leader: running workers", extra={"workers": [w.name for w in workers]})
        while True:
            await asyncio.sleep(self.retry_s)
            # the lock lives as long as this session; a ping with no answer counts as lost
            await asyncio.wait_for(conn.fetchval("SELECT 1"), self.retry_s * 2)

    def _start_loop(self, worker: Worker) -> None:
        name = f"worker-{worker.name}"
        self.sup.start(name, lambda: run_loop(worker, self._term_over, on_pass=lambda: self.sup.ok(name)))

    async def _end_term(self) -> None:
        if not self.state.is_leader:
            return
        names = [f"worker-{name}" for name in self.state.workers]
        self.sup.expect_stop(*names)  # before the event: a loop returning now is no failure
        self._term_over.set()
        for name in names:
            await self.sup.stop(name)
        health = self.state.workers.get("health")
        if isinstance(health, HealthWorker):
            await health.wait_restarts()
        self.state.is_leader = False
        self.state.workers = {}


@contextlib.asynccontextmanager
async def run_workers(dsn: str, lifecycle: Lifecycle, settings: Settings, supervisor: Supervisor,
                      more: Sequence[WorkerFactory] = ()) -> AsyncIterator[Leadership]:
    """Take part in the election for the lifetime of the context (under `supervisor`); `more`
    builds the features' workers (warm pool, webhook delivery) for each term."""
    if not settings.workers_enabled:
        yield Leadership()
        return
    election = Election(dsn, lifecycle, settings, supervisor, more)
    supervisor.start("leader-election", election.run)
    try:
        yield election.state
    finally:
        await supervisor.stop("leader-election", grace_s=0)  # cancelled: its term ends in `finally`
