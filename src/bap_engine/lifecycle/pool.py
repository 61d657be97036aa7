"""Warm pool: booted, unassigned engines a product keeps ready, so a new user waits for no boot.

A pool engine is a normal engine row with `pool = true` and a reserved user id (`_pool.<id>`),
booted with a pool key nobody is given. A claim binds one to the user in one statement (a row
lock with SKIP LOCKED: two claims never get the same engine), with the user's fresh key recorded
as pending; then the key goes to the live engine through the rotation call with overlap 0 (the
pool key stops working at once) and the key is stored. A crash in between leaves an op with a
pending key that the reconciler finishes (`finish_claim`) or undoes.

Pool engines bill no one: their audit rows name no user, and usage starts at the claim.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from bap_engine import registry
from bap_engine.errors import BackendFailed, BootTimeout, PortExhaustion
from bap_engine.keys import hash_key, new_engine_key
from bap_engine.lifecycle import boot
from bap_engine.lifecycle.clock import now
from bap_engine.lifecycle.transition import Audit, Change, Claim
from bap_engine.registry import POOL_USER_PREFIX, EngineRow, ProductRow
from bap_engine.states import AuditAction, EngineState

if TYPE_CHECKING:
    import asyncpg

    from bap_engine.lifecycle.lifecycle import Lifecycle

__all__ = ["bind", "hand_over", "fill", "finish_claim", "CLAIM_OP", "FILL_OP"]

S = EngineState
A = AuditAction
CLAIM_OP, FILL_OP = "pool_claim", "pool_fill"


async def bind(lc: Lifecycle, conn: asyncpg.Connection, product: ProductRow, user_id: str, version: str,
               key: str) -> EngineRow | None:
    """In the caller's transaction: bind a ready pool engine of this version to the user, holding
    the claim op. None when the pool has none."""
    return await registry.claim_pool_engine(conn, product.id, lc.settings.deployment, user_id, version,
                                            lc.sealer.seal(key), lc.owner_id, CLAIM_OP, lc.tx.op_ttl_s)


async def hand_over(lc: Lifecycle, bound: EngineRow, key: str, actor: str) -> EngineRow | None:
    """Give the bound engine the user's key (overlap 0) and store it. None when the engine did not
    take it: it is then destroyed (the caller boots a new one)."""
    started = time.monotonic()
    async with lc.tx.adopt(bound, CLAIM_OP) as claim:
        row = claim.row
        if await lc.push_key(row, lc.key_of(row), key, overlap_s=0) == 200:
            ms = int((time.monotonic() - started) * 1000)
            return await claim.commit(
                Change(status=S.RUNNING, api_key_hash=hash_key(key), engine_key_enc=row.pending_key_enc or "",
                       pending_key_enc=None, last_active_at=now()),
                Audit(A.POOL_CLAIM, {"engine_version": row.engine_version}, actor, ms))
        await claim.note(Change(status=S.DESTROYING), Audit(A.DESTROY, {"from": "pool", "reason":
                                                                         "did not take the user's key"}))
        await boot.halt(lc, row.id, destroy=True)
        await claim.delete()
        return None


async def fill(lc: Lifecycle, product: ProductRow, version: str, max_engines: int | None) -> EngineRow | None:
    """Boot one pool engine for the product (audited `pool_fill`). None when the quota is full.
    Raises PortExhaustion, BootTimeout, BackendFailed (its row already removed)."""
    engine_id = str(uuid.uuid4())
    async with lc.pool.acquire() as conn, conn.transaction():
        await registry.lock_product(conn, product.id)
        if max_engines is not None and await registry.count_engines(conn, product.id) >= max_engines:
            return None
        row = await lc.insert(conn, product, POOL_USER_PREFIX + engine_id, version, new_engine_key(),
                              engine_id=engine_id, pool=True, op=FILL_OP)
    started = time.monotonic()
    claim = lc.tx.adopt(row, FILL_OP)
    async with claim:
        try:
            await boot.create(lc, claim)
            await boot.await_healthy(lc, claim.row, lc.settings.boot_timeout_s - (time.monotonic() - started))
        except (BackendFailed, BootTimeout, PortExhaustion) as err:
            await boot.halt(lc, claim.row.id, destroy=True)
            await claim.delete(Audit(A.PROVISION_FAILED, {"error": err.code, "message": str(err), "pool": True}))
            raise
        ms = int((time.monotonic() - started) * 1000)
        return await claim.commit(Change(status=S.RUNNING, boot_ms=ms, last_health_at=now(), last_active_at=now()),
                                  Audit(A.POOL_FILL, {"engine_version": version, "port": claim.row.port}, "system", ms))


async def finish_claim(lc: Lifecycle, claim: Claim, found: str) -> str:
    """After a crash mid-claim: finish handing the user's pending key over, or remove the engine
    (its user gets a new one on the next provision). Idempotent."""
    row = claim.row
    assert row.pending_key_enc is not None
    key = lc.sealer.open(row.pending_key_enc)
    for auth in (lc.key_of(row), key):  # the pool key, or the engine already took the user's
        if await lc.push_key(row, auth, key, overlap_s=0) == 200:
            await claim.commit(
                Change(status=S.RUNNING, api_key_hash=hash_key(key), engine_key_enc=row.pending_key_enc,
                       pending_key_enc=None),
                Audit(A.POOL_CLAIM, {"engine_version": row.engine_version, "completed_by": "reconcile"}),
                Audit(A.RECONCILE, {"found": found, "done": "pool claim completed"}))
            return "finished"
    await claim.note(Change(status=S.DESTROYING), Audit(A.DESTROY, {"from": "pool", "by": "reconcile"}))
    await boot.backend_call(lc.backend.destroy(row.id), "destroy")
    await claim.delete(Audit(A.RECONCILE, {"found": found, "done": "pool engine removed"}))
    return "removed"
