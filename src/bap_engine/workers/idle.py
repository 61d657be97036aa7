"""Idle worker: put engines to sleep after ORCH_IDLE_SLEEP_AFTER_S without an admit,
and stop long-sleeping ones after ORCH_IDLE_STOP_AFTER_S more (they stay `sleeping`)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle, now
from bap_engine.states import EngineState

__all__ = ["IdleWorker"]


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
        for row in rows:
            if row.op is not None:
                continue
            idle_s = (t - (row.last_active_at or row.updated_at)).total_seconds()
            if row.status == EngineState.RUNNING and idle_s >= self.s.idle_sleep_after_s:
                acted += await self.lc.sleep(row, idle_s=idle_s)
            elif (row.status == EngineState.SLEEPING and row.sleep_kind == "paused"
                  and idle_s >= self.s.idle_sleep_after_s + self.s.idle_stop_after_s):
                acted += await self.lc.deep_sleep(row)
        return acted
