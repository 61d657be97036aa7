"""Reconcile worker: registry vs backend, at startup and every ORCH_RECONCILE_INTERVAL_S.

Stuck transitional rows are finished or undone, drift is corrected, and labelled
engines with no row are removed once older than the boot timeout (so a provision in
flight, whose row is written before its engine, is never raced). Product deletes no live process
carries out any more are finished first: their engines of this deployment destroyed, then the
product row once none is left (lifecycle/products.py). Fixes audit `reconcile`.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from bap_engine import registry
from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle, finish_product_deletes, now
from bap_engine.lifecycle.repair import finish_stuck, fix_drift, observe_all, remove_orphan

__all__ = ["ReconcileWorker"]

_GRACE_S = 10.0  # beyond the boot timeout before an unknown engine counts as an orphan


class ReconcileWorker:
    name = "reconcile"

    def __init__(self, lifecycle: Lifecycle, settings: Settings, clock: Callable[[], datetime] = now) -> None:
        self.lc = lifecycle
        self.s = settings
        self.interval_s = settings.reconcile_interval_s
        self._clock = clock

    async def run_once(self) -> int:
        acted = await finish_product_deletes(self.lc)
        async with self.lc.pool.acquire() as conn:
            stale = {r.id for r in await registry.stale_ops(conn, self.s.deployment)}
            rows = await registry.all_engines(conn, self.s.deployment)
        observed = await observe_all(self.lc)
        for row in rows:
            seen = observed.get(row.id)
            if row.id in stale:
                acted += await finish_stuck(self.lc, row, seen) in ("removed", "finished", "released")
            elif row.op is None and await fix_drift(self.lc, row, seen) is not None:
                acted += 1
        known = {r.id for r in rows}
        async with self.lc.pool.acquire() as conn:  # re-read: rows inserted since the snapshot
            known |= {r.id for r in await registry.all_engines(conn, self.s.deployment)}
        t = self._clock()
        for engine_id, seen in observed.items():
            if engine_id in known:
                continue
            age = (t - seen.created_at).total_seconds() if seen.created_at else float("inf")
            if age > self.s.boot_timeout_s + _GRACE_S:
                await remove_orphan(self.lc, seen)
                acted += 1
        return acted
