"""Engine settings that are not states, and the busy flag of the probes ("Busy engines are not idle").

- `idle_sleep` ('auto' | 'never'), set by PATCH /engines/{user_id}: 'never' exempts the engine from
  idle sleep. Changing it is no transition: no claim, no backend call, so it also works while
  another op holds the engine; a sleeping engine set to 'never' stays asleep until admit wakes it.
  The update and its `settings_update` audit row (only when the value changes) commit together.
- `busy`: an engine whose /health said `"busy": true` (a stream in flight, a background job) gets
  engines.busy = true and last_active_at = now(), so its idle time counts from the last busy probe
  or admit, whichever is later; one that answered ok without it gets busy = false.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from bap_engine import audit, registry
from bap_engine.errors import EngineNotFound, ValidationFailed
from bap_engine.lifecycle.lifecycle import Lifecycle
from bap_engine.lifecycle.views import EngineView, view
from bap_engine.registry import ProductRow
from bap_engine.states import AuditAction

__all__ = ["IDLE_SLEEP_VALUES", "record_busy", "set_idle_sleep"]

IDLE_SLEEP_VALUES: Final = ("auto", "never")


async def record_busy(conn: asyncpg.Connection, busy: Sequence[str], idle: Sequence[str]) -> None:
    """One statement for a sweep: `busy` engines get busy = true and last_active_at = now() (never moved
    backwards); `idle` ones (probed ok, not busy) get busy = false. Rows already idle are not rewritten."""
    ids = [*busy, *idle]
    if not ids:
        return
    await conn.execute(
        "UPDATE engines SET busy = v.busy, last_active_at = CASE WHEN v.busy "
        "THEN GREATEST(engines.last_active_at, now()) ELSE engines.last_active_at END "
        "FROM unnest($1::uuid[], $2::boolean[]) AS v(id, busy) WHERE engines.id = v.id AND (v.busy OR engines.busy)",
        ids, [True] * len(busy) + [False] * len(idle),
    )


async def set_idle_sleep(lc: Lifecycle, product: ProductRow, user_id: str, value: str, *, actor: str) -> EngineView:
    """Set the user's engine's idle_sleep; returns the engine with its key (as GET /engines/{user_id}).
    Audited `settings_update` {"idle_sleep": {"from", "to"}} only when it changes. Raises
    EngineNotFound, ValidationFailed."""
    if value not in IDLE_SLEEP_VALUES:
        raise ValidationFailed("idle_sleep must be \"auto\" or \"never\"")
    async with lc.pool.acquire() as conn, conn.transaction():
        found = await conn.fetchrow(  # locked: concurrent changes are audited in order, from what each saw
            "SELECT id::text AS id, idle_sleep FROM engines WHERE product_id = $1 AND user_id = $2 AND NOT pool "
            "FOR UPDATE", product.id, user_id)
        if found is None:
            raise EngineNotFound()
        engine_id, old = str(found["id"]), str(found["idle_sleep"])
        if old != value:
            await conn.execute("UPDATE engines SET idle_sleep = $2 WHERE id = $1", engine_id, value)
            await audit.write(conn, AuditAction.SETTINGS_UPDATE, product_id=product.id, user_id=user_id,
                              engine_id=engine_id, actor=actor, metadata={"idle_sleep": {"from": old, "to": value}})
        row = await registry.get_engine_by_id(conn, engine_id)
    if row is None:  # unreachable: the row is locked until the transaction ends
        raise EngineNotFound()
    return view(row, lc.key_of(row))
