"""The one transition executor: claim → backend → typed update + audit rows → release.

Every lifecycle op, every repair of the reconciler and every worker decision runs as

    claim = await transitions.claim(engine_id, "sleep")      # the intent: op, owner, deadline
    async with claim:                                        # any error (or no commit): released
        await backend.pause(engine_id)                       # outside any transaction
        await claim.commit(Change(status=SLEEPING), Audit(AuditAction.SLEEP, {...}))

`commit` writes the row's typed update and all of its audit rows in one transaction and
releases the op; `delete` does the same for the row's removal; `note` records a further intent
(a runtime handle, a pending key) while keeping the claim. So "every state change has its audit
row in the same transaction" holds by construction, and the state table is checked in one place.

Crash points: with `BAP_CRASH_AT=<phase>:<op>` in the environment (phase `claimed` — the intent
is committed, nothing else done — or `commit` — the backend call is done, its outcome not yet
recorded) the process kills itself with SIGKILL there. The fault suite uses it to kill the
orchestrator inside every op; nothing sets it in production.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from types import TracebackType

import asyncpg
import orjson

from bap_engine import audit, registry
from bap_engine.errors import BapError, EngineBusy, EngineNotFound, InternalError
from bap_engine.registry import EngineRow
from bap_engine.states import AuditAction, EngineState, can_transition

__all__ = ["Change", "Audit", "Claim", "Transitions", "UNSET", "crashpoint"]

log = logging.getLogger("bap_engine.lifecycle")
_DB_LOST = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError)  # TimeoutError is an OSError


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """A typed update of an engine row: only the fields given are written."""

    status: EngineState | _Unset = UNSET
    sleep_kind: str | None | _Unset = UNSET
    health_failures: int | _Unset = UNSET
    restart_attempts: int | _Unset = UNSET
    next_restart_at: datetime | None | _Unset = UNSET
    last_health_at: datetime | None | _Unset = UNSET
    last_active_at: datetime | None | _Unset = UNSET
    ref: str | None | _Unset = UNSET
    url: str | None | _Unset = UNSET
    port: int | _Unset = UNSET
    boot_ms: int | _Unset = UNSET
    api_key_hash: str | _Unset = UNSET
    engine_key_enc: str | _Unset = UNSET
    pending_key_enc: str | None | _Unset = UNSET
    engine_version: str | _Unset = UNSET
    upgrade_to: str | None | _Unset = UNSET

    def values(self) -> dict[str, object]:
        return {f.name: v for f in fields(self) if (v := getattr(self, f.name)) is not UNSET}


@dataclass(frozen=True, slots=True)
class Audit:
    """One audit row to write with the change."""

    action: AuditAction
    metadata: Mapping[str, object] | None = None
    actor: str = "system"
    duration_ms: int | None = None


def crashpoint(phase: str, op: str) -> None:
    """Die here (SIGKILL, like kill -9) when BAP_CRASH_AT names this point: the fault suite's hook."""
    if os.environ.get("BAP_CRASH_AT") == f"{phase}:{op}":
        os.kill(os.getpid(), signal.SIGKILL)


class Claim:
    """An op held on one engine until committed, deleted or released.

    Every write is conditional on this owner still holding this op, so a claim that was taken
    over (its deadline passed) can never overwrite what the new holder did: it raises EngineBusy.
    Leaving the block without a commit releases the op after a deliberate BapError (nothing was
    half done), and otherwise - a lost database, a cancellation, a bug - expires it, so the
    reconciler looks at the engine at once instead of after the op's deadline."""

    def __init__(self, tx: Transitions, row: EngineRow, op: str) -> None:
        self._tx = tx
        self._pool = tx.pool
        self.row = row
        self.op = op
        self._open = True

    async def __aenter__(self) -> Claim:
        return self

    async def __aexit__(self, kind: type[BaseException] | None, err: BaseException | None,
                        tb: TracebackType | None) -> None:
        if not self._open:
            return
        if err is None or isinstance(err, BapError):
            await self.release()
        else:
            await self.expire()

    async def note(self, change: Change, *audits: Audit) -> EngineRow:
        """Record a further intent (keeps the claim)."""
        self._check(change)
        values = change.values()
        async with self._pool.acquire() as conn, conn.transaction():
            if values:
                self.row = self._held(await registry.update_claimed(conn, self.row.id, self._tx.owner_id, self.op,
                                                                    **values))
            await _write(conn, self.row, audits, _entered(change))
        return self.row

    async def commit(self, change: Change | None = None, *audits: Audit) -> EngineRow:
        """The outcome: the row's update and its audit rows in one transaction; releases the op."""
        crashpoint("commit", self.op)
        change = change or Change()
        self._check(change)
        async with self._pool.acquire() as conn, conn.transaction():
            row = await registry.update_claimed(conn, self.row.id, self._tx.owner_id, self.op, op=None,
                                                op_owner=None, op_deadline=None, **change.values())
            self.row = self._held(row)
            await _write(conn, self.row, audits, _entered(change))
        self._open = False
        return self.row

    async def delete(self, *audits: Audit) -> None:
        """The row is gone (destroyed, or a failed provision undone), with its audit rows."""
        crashpoint("commit", self.op)
        async with self._pool.acquire() as conn, conn.transaction():
            if not await registry.delete_claimed(conn, self.row.id, self._tx.owner_id, self.op):
                self._held(None)
            await _write(conn, self.row, audits, "gone")
        self._open = False

    async def release(self, *audits: Audit) -> None:
        """Give the op up without a state change (optionally noting why)."""
        self._open = False
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                if await registry.update_claimed(conn, self.row.id, self._tx.owner_id, self.op, op=None,
                                                 op_owner=None, op_deadline=None):
                    await _write(conn, self.row, audits)
        except _DB_LOST as err:
            self._tx.dangle(self, err)

    async def expire(self) -> None:
        """The op ended in an unknown state: let the reconciler finish or undo it now."""
        self._open = False
        try:
            async with self._pool.acquire() as conn:
                await registry.expire_op(conn, self.row.id, self._tx.owner_id, self.op)
        except _DB_LOST as err:
            self._tx.dangle(self, err)

    def _held(self, row: EngineRow | None) -> EngineRow:
        if row is None:
            self._open = False
            raise EngineBusy("another process took this operation over; retry")
        return row

    def _check(self, change: Change) -> None:
        new, old = change.status, self.row.status
        if isinstance(new, EngineState) and new != old and not can_transition(old, new):
            raise InternalError(f"transition {old} → {new} is not in the state table")


def _entered(change: Change) -> str | None:
    return None if isinstance(change.status, _Unset) else str(change.status)


async def _write(conn: asyncpg.Connection, row: EngineRow, audits: tuple[Audit, ...],
                 state: str | None = None) -> None:
    """The rows of one change; the first carries the state it entered (what usage reads). A pool
    engine's rows name no user."""
    user_id = None if row.pool else row.user_id
    for i, a in enumerate(audits):
        metadata = orjson.loads(orjson.dumps(a.metadata)) if a.metadata is not None else None
        await audit.write(conn, a.action, product_id=row.product_id, user_id=user_id, engine_id=row.id,
                          actor=a.actor, metadata=metadata, duration_ms=a.duration_ms,
                          state=state if i == 0 else None)


class Transitions:
    """Claims ops for this process (its owner id is a live advisory lock, see owner.py)."""

    def __init__(self, pool: asyncpg.Pool, owner_id: int, op_ttl_s: float) -> None:
        self.pool = pool
        self.owner_id = owner_id
        self.op_ttl_s = op_ttl_s
        self._dangling: dict[str, str] = {}  # engine id → op whose end could not be written

    def dangle(self, claim: Claim, err: BaseException) -> None:
        log.warning("op not handed back (database unreachable); it will be expired once it answers",
                    extra={"engine_id": claim.row.id, "op": claim.op, "error": repr(err)})
        self._dangling[claim.row.id] = claim.op

    async def expire_dangling(self, every_s: float = 1.0) -> None:
        """Supervised: expire the ops whose release or expiry met a lost database, once it is back."""
        while True:
            await asyncio.sleep(every_s)
            for engine_id, op in list(self._dangling.items()):
                try:
                    async with self.pool.acquire() as conn:
                        await registry.expire_op(conn, engine_id, self.owner_id, op)
                except _DB_LOST:
                    break
                self._dangling.pop(engine_id, None)

    async def claim(self, engine_id: str, op: str) -> Claim | None:
        """Claim an engine by id; None when another live op holds it (or it is gone)."""
        async with self.pool.acquire() as conn:
            row = await registry.claim_op(conn, engine_id, op, self.owner_id, self.op_ttl_s)
        if row is None:
            return None
        crashpoint("claimed", op)
        return Claim(self, row, op)

    async def claim_user(self, product_id: str, user_id: str, op: str, *, ttl_s: float | None = None) -> Claim:
        """Claim a product's user's engine (for `ttl_s`, by default the op TTL). Raises EngineNotFound,
        EngineBusy."""
        async with self.pool.acquire() as conn:
            row = await registry.get_engine(conn, product_id, user_id)
            if row is None:
                raise EngineNotFound()
            claimed = await registry.claim_op(conn, row.id, op, self.owner_id, ttl_s or self.op_ttl_s)
        if claimed is None:
            raise EngineBusy()
        crashpoint("claimed", op)
        return Claim(self, claimed, op)

    def adopt(self, row: EngineRow, op: str) -> Claim:
        """A claim on a row inserted already holding `op` for this owner (provision)."""
        crashpoint("claimed", op)
        return Claim(self, row, op)
