"""Health worker: probe every running engine, mark failures, restart with backoff.

One sweep: one query for the running engines, one backend list call, concurrent
probes (bounded), then batched writes. A probe that says `"busy": true` marks the engine
busy and advances its last_active_at (the idle worker leaves it awake); an ok one without it
clears busy — one more batched statement, after the probes' own. Failed engines are restarted after
min(BASE·2ⁿ, MAX) seconds (+ up to 10 % jitter) until ORCH_RESTART_MAX_ATTEMPTS.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta

import asyncpg

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.errors import BapError
from bap_engine.lifecycle import Lifecycle, Observed, ObservedState, Probe, now, probe_status, record_busy
from bap_engine.lifecycle.repair import observe_all
from bap_engine.registry import EngineRow
from bap_engine.states import EngineState
from bap_engine.supervisor import Supervisor

__all__ = ["HealthWorker", "backoff_s"]

log = logging.getLogger("bap_engine.workers.health")


def backoff_s(attempt: int, base: float, cap: float, jitter: float = 0.1) -> float:
    """Delay before restart attempt n (0-based): min(base·2ⁿ, cap) plus up to 10 % jitter."""
    delay = min(base * (2**attempt), cap)
    return float(delay + random.uniform(0, jitter * delay))


class HealthWorker:
    name = "health"

    def __init__(self, lifecycle: Lifecycle, settings: Settings, clock: Callable[[], datetime] = now, *,
                 supervisor: Supervisor | None = None) -> None:
        self.lc = lifecycle
        self._sup = supervisor or Supervisor()
        self.s = settings
        self.interval_s = settings.health_check_interval_s
        self._clock = clock
        self._audited: dict[str, float] = {}  # engine id → monotonic time of its last health_check row
        self._restarts: dict[str, asyncio.Task[None]] = {}
        self.last_sweep_s = 0.0

    async def run_once(self) -> int:
        started = time.monotonic()
        pool: asyncpg.Pool = self.lc.pool
        async with pool.acquire() as conn:
            running = await registry.engines_in_states(conn, self.s.deployment, [EngineState.RUNNING])
        observed = await observe_all(self.lc)
        results = await self._probe_all(running, observed)
        ok = [r for r, p in zip(running, results, strict=True) if p.ok]
        bad = [r for r, p in zip(running, results, strict=True) if not p.ok]
        acted = await self._record(ok, bad)
        await self._record_busy(running, results)
        acted += await self._restart_due()
        self.last_sweep_s = time.monotonic() - started
        return acted

    async def _probe_all(self, rows: list[EngineRow], observed: Mapping[str, Observed]) -> list[Probe]:
        gate = asyncio.Semaphore(self.s.health_concurrency)

        async def probe(row: EngineRow) -> Probe:
            seen = observed.get(row.id)
            if seen is None or seen.state in (ObservedState.EXITED, ObservedState.ABSENT) or row.url is None:
                return Probe(ok=False)  # vanished: no need to wait for a timeout
            async with gate:
                return await probe_status(row.url, self.s.health_check_timeout_s)

        return list(await asyncio.gather(*(probe(r) for r in rows)))

    async def _record_busy(self, rows: list[EngineRow], results: list[Probe]) -> None:
        """Busy engines: busy and last_active_at = now(); ok idle ones that were busy: not any more.
        A failed probe says nothing either way."""
        busy = [r.id for r, p in zip(rows, results, strict=True) if p.busy]
        idle = [r.id for r, p in zip(rows, results, strict=True) if p.ok and not p.busy and r.busy]
        if busy or idle:
            async with self.lc.pool.acquire() as conn:
                await record_busy(conn, busy, idle)

    async def _record(self, ok: list[EngineRow], bad: list[EngineRow]) -> int:
        counts = await self.lc.record_probes(ok, bad, self._sample(ok))
        acted = 0
        first_delay = timedelta(seconds=backoff_s(0, self.s.restart_backoff_base_s, self.s.restart_backoff_max_s))
        for row in bad:
            failures = counts.get(row.id, 0)
            if failures >= self.s.health_max_failures:
                reason = f"{failures} consecutive failed probes"
                if await self.lc.mark_failed(row, reason=reason, next_restart_at=self._clock() + first_delay):
                    acted += 1
        return acted

    def _sample(self, ok: list[EngineRow]) -> list[EngineRow]:
        t = time.monotonic()
        period = self.s.health_audit_sample_s
        picked = [r for r in ok if t - self._audited.get(r.id, -1e18) >= period]
        for r in picked:
            self._audited[r.id] = t
        return picked

    async def _restart_due(self) -> int:
        async with self.lc.pool.acquire() as conn:
            due = await registry.due_restarts(conn, self.s.deployment, self.s.restart_max_attempts)
        started = 0
        in_flight = sum(1 for t in self._restarts.values() if not t.done())
        cap = max(1, self.s.health_concurrency // 5)  # a mass failure must not boot the whole fleet at once
        for row in due:
            task = self._restarts.get(row.id)
            if task is not None and not task.done():
                continue
            if in_flight + started >= cap:
                break
            self._restarts[row.id] = self._sup.spawn(f"restart-{row.id}", self._restart(row), family="restart")
            started += 1
        return started

    async def wait_restarts(self) -> None:
        """For tests and shutdown: wait for restart attempts in flight."""
        tasks = [t for t in self._restarts.values() if not t.done()]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _restart(self, row: EngineRow) -> None:
        attempt = row.restart_attempts
        last = attempt + 1 >= self.s.restart_max_attempts
        retry_in = None if last else backoff_s(attempt + 1, self.s.restart_backoff_base_s, self.s.restart_backoff_max_s)
        try:
            await self.lc.restart(row, attempt, retry_in_s=retry_in)
        except BapError:
            pass  # recorded by lifecycle (auto_restart_failed, or gave_up); anything else escapes to the supervisor
