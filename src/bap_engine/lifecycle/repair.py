"""Repairs for the reconciler: finish or undo what a crash left, fix drift.

Each function acts on one engine through the transition executor (so its `reconcile` audit row
is written in the same transaction as the fix) and is idempotent: a second run finds nothing
left to do.
"""

from __future__ import annotations

from bap_engine import audit
from bap_engine.backends.base import BackendError, Observed, ObservedState
from bap_engine.errors import BackendFailed
from bap_engine.lifecycle import pool, upgrade
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.lifecycle import Lifecycle
from bap_engine.lifecycle.probe import probe_health
from bap_engine.lifecycle.transition import Audit, Change, Claim
from bap_engine.registry import EngineRow
from bap_engine.states import AuditAction, EngineState

__all__ = ["observe_all", "finish_stuck", "fix_drift", "remove_orphan"]

S = EngineState
Obs = ObservedState
A = AuditAction


async def observe_all(lc: Lifecycle) -> dict[str, Observed]:
    """Every engine of this deployment the backend holds (one list call)."""
    return {o.engine_id: o for o in await lc.backend.list_managed()}


def _reconcile(found: str, done: str) -> Audit:
    return Audit(A.RECONCILE, {"found": found, "done": done})


async def finish_stuck(lc: Lifecycle, row: EngineRow, seen: Observed | None) -> str:
    """An op whose owner died or whose deadline passed: finish it or undo it."""
    claim = await lc.tx.claim(row.id, "reconcile")
    if claim is None:
        return "busy"
    async with claim:
        try:
            return await _finish(lc, claim, row.op or "?")
        except (BackendError, BackendFailed):
            return "backend error"  # released by the claim; the next pass tries again


async def _finish(lc: Lifecycle, claim: Claim, op: str) -> str:
    c = claim.row
    found = f"{c.status} with an abandoned '{op}' op"
    if c.status == S.DESTROYING:
        await lc.destroy_claimed(claim, actor="system", found=found)
        return "removed"
    if c.status == S.PROVISIONING and not await _healthy(lc, c):
        await lc.backend.destroy(c.id)
        await claim.delete(Audit(A.PROVISION_FAILED, {"error": "ORCHESTRATOR_CRASH", "by": "reconcile"}),
                           _reconcile(found, "engine and row removed"))
        return "removed"
    if c.upgrade_to is not None:  # an upgrade (or the reconciler's own repair of one) was cut short
        return await upgrade.finish(lc, claim, found)
    if op == pool.CLAIM_OP and c.pending_key_enc is not None and c.status == S.RUNNING:
        return await pool.finish_claim(lc, claim, found)
    if c.pending_key_enc is not None and c.status == S.RUNNING:
        await lc.complete_rotation(claim, found)
        return "finished"
    if op == "stop" and c.status in (S.RUNNING, S.SLEEPING):  # the caller asked for a stop: honour it
        await lc.backend.stop(c.id, lc.settings.stop_grace_s)
        await claim.commit(Change(status=S.STOPPED, sleep_kind=None), Audit(A.STOP, {"from": str(c.status),
                           "by": "reconcile"}), _reconcile(found, "stop completed"))
        return "finished"
    if c.status == S.PROVISIONING:
        await claim.commit(Change(status=S.RUNNING, last_health_at=now(), last_active_at=now()),
                           Audit(A.POOL_FILL if c.pool else A.PROVISION,
                                 {"engine_version": c.engine_version, "by": "reconcile"}),
                           _reconcile(found, "marked running"))
        return "finished"
    await claim.release(_reconcile(found, "op released"))
    return "released"


async def _healthy(lc: Lifecycle, row: EngineRow) -> bool:
    return row.url is not None and await probe_health(row.url, lc.settings.health_check_timeout_s)


async def fix_drift(lc: Lifecycle, row: EngineRow, seen: Observed | None) -> str | None:
    """Row vs runtime disagree: correct the runtime or the row. None when nothing to do."""
    state = seen.state if seen is not None else Obs.ABSENT
    if row.status == S.RUNNING and state == Obs.PAUSED:
        return await _act(lc, row, "running row, paused engine", "resumed", lc.backend.resume)
    if row.status == S.RUNNING and state in (Obs.EXITED, Obs.ABSENT):
        found = f"running row, engine {state}"
        failed = await lc.mark_failed(row, reason=f"engine {state}", next_restart_at=now(), by="reconcile",
                                      extra=[_reconcile(found, "marked failed for restart")])
        return "failed" if failed else None
    if row.status == S.SLEEPING and row.sleep_kind == "paused" and state in (Obs.EXITED, Obs.ABSENT):
        return await _act(lc, row, f"sleeping row, engine {state}", "will be started on wake", None,
                          Change(sleep_kind="stopped"))
    if row.status == S.STOPPED and state in (Obs.RUNNING, Obs.PAUSED):
        return await _act(lc, row, f"stopped row, engine {state}", "stopped",
                          lambda engine_id: lc.backend.stop(engine_id, lc.settings.stop_grace_s))
    if row.status == S.DESTROYING:  # a destroy whose backend call failed: finish it
        return await finish_stuck(lc, row, seen)
    return None


async def _act(lc: Lifecycle, row: EngineRow, found: str, done: str, call: object,
               change: Change | None = None) -> str | None:
    claim = await lc.tx.claim(row.id, "reconcile")
    if claim is None:
        return None
    async with claim:
        if claim.row.status != row.status:
            return None
        try:
            if call is not None:
                await call(row.id)  # type: ignore[operator]
        except BackendError:
            return None
        await claim.commit(change, _reconcile(found, done))
        return done


async def remove_orphan(lc: Lifecycle, seen: Observed) -> None:
    """A labelled engine with no row: remove it (the caller checked its age). No engine row
    changes, so the reconcile row is written on its own."""
    await lc.backend.destroy(seen.engine_id)
    async with lc.pool.acquire() as conn:
        await audit.write(conn, AuditAction.RECONCILE, engine_id=None,
                          product_id=seen.labels.get("bap-engine.product_id") or None,
                          metadata={"found": f"engine {seen.engine_id} without a row ({seen.state})",
                                    "done": "removed from the backend", "orphan_engine_id": seen.engine_id})
