"""Lifecycle operations beyond the basic verbs: key rotation, sleep/wake, restarts."""

from __future__ import annotations

import asyncio
import time

import orjson

from bap_engine import audit, registry
from bap_engine.backends.base import BackendError
from bap_engine.errors import BackendFailed, EngineBusy, EngineNotRunning
from bap_engine.keys import hash_key, new_engine_key
from bap_engine.lifecycle.probe import call_engine
from bap_engine.lifecycle.service import LifecycleCore
from bap_engine.registry import EngineRow, ProductRow, get_engine_by_id, update_engine
from bap_engine.states import AuditAction, EngineState

__all__ = ["Lifecycle"]

S = EngineState


class Lifecycle(LifecycleCore):
    async def rotate_key(self, product: ProductRow, user_id: str, *, actor: str) -> tuple[EngineRow, str]:
        """Hand a new key's hash to the live engine, then store it. Returns (row, new key).

        The sealed new key is recorded first, so a crash mid-rotation is completed by the
        reconciler (see complete_rotation). Raises EngineNotFound, EngineBusy,
        EngineNotRunning, BackendFailed."""
        row = await self._claim(product.id, user_id, "rotate_key")
        if row.status != S.RUNNING:
            await self.release(row)
            raise EngineNotRunning()
        new_key = new_engine_key()
        async with self.pool.acquire() as conn:  # intent
            row = await update_engine(conn, row.id, pending_key_enc=self.sealer.seal(new_key)) or row
        status = await self._push_key(row, auth=self.key_of(row), new_key=new_key)
        if status != 200:
            await self.finish(row, None, pending_key_enc=None)
            why = "does not support live key rotation" if status == 404 else f"answered {status}"
            raise BackendFailed(f"engine {why}" if status else "engine did not answer the key rotation")
        overlap = self.settings.key_rotation_overlap_s
        row = await self.finish(row, AuditAction.ROTATE_KEY, actor=actor, metadata={"overlap_seconds": overlap},
                                api_key_hash=hash_key(new_key), engine_key_enc=self.sealer.seal(new_key),
                                pending_key_enc=None)
        return row, new_key

    async def _push_key(self, row: EngineRow, *, auth: str, new_key: str) -> int:
        """POST /_bap/rotate-key; the HTTP status, or 0 when the engine did not answer."""
        assert row.url is not None
        try:
            reply = await call_engine(
                row.url, "POST", "/_bap/rotate-key", key=auth, timeout=self.settings.health_check_timeout_s,
                payload={"key_hash": hash_key(new_key), "overlap_seconds": self.settings.key_rotation_overlap_s})
        except (OSError, TimeoutError):
            return 0
        return reply.status

    async def complete_rotation(self, row: EngineRow) -> bool:
        """After a crash mid-rotation: make engine and row agree on the pending key (idempotent).
        True when the new key is now stored; False when the rotation was dropped."""
        assert row.pending_key_enc is not None
        new_key = self.sealer.open(row.pending_key_enc)
        for auth in (self.key_of(row), new_key):  # old key (within the overlap), or the engine already moved on
            if await self._push_key(row, auth=auth, new_key=new_key) == 200:
                await self.finish(row, AuditAction.ROTATE_KEY, metadata={"completed_by": "reconcile"},
                                  api_key_hash=hash_key(new_key), engine_key_enc=row.pending_key_enc,
                                  pending_key_enc=None)
                return True
        await self.finish(row, None, pending_key_enc=None)
        return False

    async def wake(self, row: EngineRow, *, actor: str) -> EngineRow:
        """sleeping → running for admit(auto_wake); waits for a concurrent transition.
        Raises EngineBusy (timeout), BootTimeout, BackendFailed."""
        deadline = time.monotonic() + self.settings.boot_timeout_s
        while True:
            claimed = await self.claim_row(row, "wake")
            if claimed is not None:
                break
            if time.monotonic() > deadline:
                raise EngineBusy()
            await asyncio.sleep(0.02)
            async with self.pool.acquire() as conn:
                fresh = await get_engine_by_id(conn, row.id)
            if fresh is None or fresh.status != S.SLEEPING:
                return fresh or row
        if claimed.status != S.SLEEPING:
            await self.release(claimed)
            return claimed
        return await self.bring_up(claimed, AuditAction.WAKE, actor=actor)

    async def sleep(self, row: EngineRow, *, idle_s: float) -> bool:
        """running → sleeping after idleness, by ORCH_SLEEP_MODE. False when busy or changed."""
        claimed = await self.claim_row(row, "sleep")
        if claimed is None:
            return False
        if claimed.status != S.RUNNING:
            await self.release(claimed)
            return False
        mode = self.settings.sleep_mode
        try:
            if mode == "pause":
                await self.backend.pause(row.id)
            elif mode == "stop":
                await self.backend.stop(row.id, self.settings.stop_grace_s)
        except BackendError:
            await self.release(claimed)
            return False
        kind = {"pause": "paused", "stop": "stopped", "label": "label"}[mode]
        await self.finish(claimed, AuditAction.SLEEP, metadata={"mode": mode, "idle_s": round(idle_s)},
                          status=S.SLEEPING, sleep_kind=kind)
        return True

    async def deep_sleep(self, row: EngineRow) -> bool:
        """A long-sleeping paused engine is stopped to free memory; it stays `sleeping`."""
        claimed = await self.claim_row(row, "deep_sleep")
        if claimed is None:
            return False
        if claimed.status != S.SLEEPING or claimed.sleep_kind == "stopped":
            await self.release(claimed)
            return False
        try:
            await self.backend.stop(row.id, self.settings.stop_grace_s)
        except BackendError:
            await self.release(claimed)
            return False
        await self.finish(claimed, AuditAction.SLEEP, metadata={"mode": "stop", "stage": "long_idle"},
                          sleep_kind="stopped")
        return True

    async def mark_failed(self, row: EngineRow, *, reason: str, next_restart_at: object) -> bool:
        """running → failed after consecutive probe failures (audit health_failed)."""
        claimed = await self.claim_row(row, "mark_failed")
        if claimed is None:
            return False
        if claimed.status != S.RUNNING:
            await self.release(claimed)
            return False
        await self.finish(claimed, AuditAction.HEALTH_FAILED, metadata={"reason": reason},
                          status=S.FAILED, restart_attempts=0, next_restart_at=next_restart_at)
        return True

    async def restart(self, row: EngineRow, attempt: int) -> EngineRow | None:
        """One auto-restart attempt of a failed engine; None when busy or no longer failed.
        Raises BootTimeout/BackendFailed (the engine stays failed)."""
        claimed = await self.claim_row(row, "restart")
        if claimed is None:
            return None
        if claimed.status != S.FAILED:
            await self.release(claimed)
            return None
        return await self.bring_up(claimed, AuditAction.AUTO_RESTART_SUCCESS, actor="system",
                                   metadata={"attempt": attempt})

    async def audit_event(self, row: EngineRow, action: AuditAction, metadata: dict[str, object],
                          **values: object) -> None:
        """Write an audit row (with optional column updates) for a worker decision."""
        async with self.pool.acquire() as conn, conn.transaction():
            if values:
                await registry.update_engine(conn, row.id, **values)
            await audit.write(conn, action, product_id=row.product_id, user_id=row.user_id,
                              engine_id=row.id, metadata=orjson.loads(orjson.dumps(metadata)))
