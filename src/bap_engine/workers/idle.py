"""Idle worker: put engines to sleep after ORCH_IDLE_SLEEP_AFTER_S without an admit,
and stop long-sleeping ones after ORCH_IDLE_STOP_AFTER_S more (they stay `sleeping`).

Busy engines are not idle. Idle time counts from last_active_at, which admits and busy probes
advance. An engine is never put to sleep while its last probe said busy (engines.busy), nor when
its idle_sleep is 'never', nor when it is a warm-pool engine; and right before it is put to sleep it
is probed once more, so a stream begun since the last health sweep is not frozen: a busy answer is
recorded (busy, last_active_at = now()) and the engine left awake. A probe that fails says nothing
of work: the engine is slept as before (failures are the health worker's business).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle, now, probe_status, record_busy
from bap_engine.registry import EngineRow
from bap_engine.states import EngineState

__all__ = ["IdleWorker"]

_SLEEP_CONCURRENCY = 4  # probe-then-sleep pairs at once: a hung engine's probe timeout does not stall the pass


class IdleWorker:
    name = "idle"

    def __init__(self, lifecycle: Lifecycle, settings: Settings, clock: Callable[[], datetime] = now) -> None:
        self.lc = lifecycle
        self.s = settings
        self.interval_s = min(settings.health_check_interval_s, settings.idle_sleep_after_s / 2, 60.0)
        self._clock = clock

    async def run_once(self) -> int:
        async with self.lc.pool.acquire() as conn:
            awake_or_asleep = [EngineState.RUNNING, EngineState.SLEEPING]
            rows = await registry.engines_in_states(conn, self.s.deployment, awake_or_asleep)
        t = self._clock()
        acted = 0
        due: list[tuple[EngineRow, float]] = []
        for row in rows:
            if row.op is not None or row.pool:
                continue
            idle_s = (t - (row.last_active_at or row.updated_at)).total_seconds()
            if row.status == EngineState.RUNNING and idle_s >= self.s.idle_sleep_after_s:
                if row.idle_sleep != "never" and not row.busy:
                    due.append((row, idle_s))
            elif (row.status == EngineState.SLEEPING and row.sleep_kind == "paused"
                  and idle_s >= self.s.idle_sleep_after_s + self.s.idle_stop_after_s):
                acted += await self.lc.deep_sleep(row)
        if due:
            gate = asyncio.Semaphore(_SLEEP_CONCURRENCY)
            acted += sum(await asyncio.gather(*(self._sleep_unless_busy(row, idle_s, gate) for row, idle_s in due)))
        return acted

    async def _sleep_unless_busy(self, row: EngineRow, idle_s: float, gate: asyncio.Semaphore) -> bool:
        async with gate:
            if row.url is not None and (await probe_status(row.url, self.s.health_check_timeout_s)).busy:
                async with self.lc.pool.acquire() as conn:
                    await record_busy(conn, [row.id], [])
                return False
            return await self.lc.sleep(row, idle_s=idle_s)
