"""Repairs for the reconciler: finish or undo what a crash left, fix drift.

Each function acts on one engine, audits `reconcile` with what it found and did, and
is idempotent (a second run finds nothing left to do).
"""

from __future__ import annotations

from bap_engine import audit, registry
from bap_engine.backends.base import BackendError, Observed, ObservedState
from bap_engine.lifecycle.ops import Lifecycle
from bap_engine.lifecycle.probe import probe_health
from bap_engine.lifecycle.service import now
from bap_engine.registry import EngineRow
from bap_engine.states import AuditAction, EngineState

__all__ = ["observe_all", "finish_stuck", "fix_drift", "remove_orphan"]

S = EngineState
Obs = ObservedState


async def observe_all(lc: Lifecycle) -> dict[str, Observed]:
    """Every engine of this deployment the backend holds (one list call)."""
    return {o.engine_id: o for o in await lc.backend.list_managed()}


async def _note(lc: Lifecycle, row: EngineRow, found: str, done: str) -> None:
    async with lc.pool.acquire() as conn:
        await audit.write(conn, AuditAction.RECONCILE, product_id=row.product_id, user_id=row.user_id,
                          engine_id=row.id, metadata={"found": found, "done": done})


async def finish_stuck(lc: Lifecycle, row: EngineRow, seen: Observed | None) -> str:
    """An op whose owner died or whose deadline passed: finish it or undo it."""
    claimed = await lc.claim_row(row, "reconcile")
    if claimed is None:
        return "busy"
    found = f"{claimed.status} with an abandoned '{row.op}' op"
    if claimed.status == S.DESTROYING or (claimed.status == S.PROVISIONING and not await _healthy(lc, claimed)):
        try:
            await lc.backend.destroy(claimed.id)
        except BackendError:
            await lc.release(claimed)
            return "backend error"
        async with lc.pool.acquire() as conn, conn.transaction():
            await registry.delete_engine(conn, claimed.id)
            action = AuditAction.DESTROY if claimed.status == S.DESTROYING else AuditAction.PROVISION_FAILED
            await audit.write(conn, action, product_id=claimed.product_id, user_id=claimed.user_id,
                              engine_id=claimed.id, metadata={"error": "ORCHESTRATOR_CRASH", "by": "reconcile"})
            await audit.write(conn, AuditAction.RECONCILE, product_id=claimed.product_id, user_id=claimed.user_id,
                              engine_id=claimed.id, metadata={"found": found, "done": "engine and row removed"})
        return "removed"
    if claimed.pending_key_enc is not None and claimed.status == S.RUNNING:
        done = await lc.complete_rotation(claimed)
        await _note(lc, claimed, found, "rotation completed" if done else "rotation dropped")
        return "finished"
    if row.op == "stop" and claimed.status in (S.RUNNING, S.SLEEPING):  # the caller asked for a stop: honour it
        try:
            await lc.backend.stop(claimed.id, lc.settings.stop_grace_s)
        except BackendError:
            await lc.release(claimed)
            return "backend error"
        await lc.finish(claimed, AuditAction.RECONCILE, metadata={"found": found, "done": "stop completed"},
                        status=S.STOPPED, sleep_kind=None)
        return "finished"
    if claimed.status == S.PROVISIONING:
        await lc.finish(claimed, AuditAction.RECONCILE, metadata={"found": found, "done": "marked running"},
                        status=S.RUNNING, last_health_at=now(), last_active_at=now())
        return "finished"
    await lc.release(claimed)
    await _note(lc, claimed, found, "op released")
    return "released"


async def _healthy(lc: Lifecycle, row: EngineRow) -> bool:
    return row.url is not None and await probe_health(row.url, lc.settings.health_check_timeout_s)


async def fix_drift(lc: Lifecycle, row: EngineRow, seen: Observed | None) -> str | None:
    """Row vs runtime disagree: correct the runtime or the row. None when nothing to do."""
    state = seen.state if seen is not None else Obs.ABSENT
    if row.status == S.RUNNING and state == Obs.PAUSED:
        return await _act(lc, row, "running row, paused engine", "resumed", lc.backend.resume)
    if row.status == S.RUNNING and state in (Obs.EXITED, Obs.ABSENT):
        claimed = await lc.claim_row(row, "reconcile")
        if claimed is None or claimed.status != S.RUNNING:
            if claimed is not None:
                await lc.release(claimed)
            return None
        await lc.finish(claimed, AuditAction.HEALTH_FAILED, metadata={"reason": f"engine {state}", "by": "reconcile"},
                        status=S.FAILED, restart_attempts=0, next_restart_at=now())
        await _note(lc, claimed, f"running row, engine {state}", "marked failed for restart")
        return "failed"
    if row.status == S.SLEEPING and row.sleep_kind == "paused" and state in (Obs.EXITED, Obs.ABSENT):
        async with lc.pool.acquire() as conn:
            await registry.update_engine(conn, row.id, sleep_kind="stopped")
        await _note(lc, row, f"sleeping row, engine {state}", "will be started on wake")
        return "relabelled"
    if row.status == S.STOPPED and state in (Obs.RUNNING, Obs.PAUSED):
        return await _act(lc, row, f"stopped row, engine {state}", "stopped",
                          lambda engine_id: lc.backend.stop(engine_id, lc.settings.stop_grace_s))
    return None


async def _act(lc: Lifecycle, row: EngineRow, found: str, done: str, call: object) -> str | None:
    claimed = await lc.claim_row(row, "reconcile")
    if claimed is None:
        return None
    if claimed.status != row.status:
        await lc.release(claimed)
        return None
    try:
        await call(row.id)  # type: ignore[operator]
    except BackendError:
        await lc.release(claimed)
        return None
    await lc.finish(claimed, AuditAction.RECONCILE, metadata={"found": found, "done": done})
    return done


async def remove_orphan(lc: Lifecycle, seen: Observed) -> None:
    """A labelled engine with no row: remove it (the caller checked its age)."""
    await lc.backend.destroy(seen.engine_id)
    async with lc.pool.acquire() as conn:
        await audit.write(conn, AuditAction.RECONCILE, engine_id=None,
                          product_id=seen.labels.get("bap-engine.product_id") or None,
                          metadata={"found": f"engine {seen.engine_id} without a row ({seen.state})",
                                    "done": "removed from the backend", "orphan_engine_id": seen.engine_id})
