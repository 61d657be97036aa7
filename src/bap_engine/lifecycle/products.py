"""A deleted product's engines destroyed, then its row.

`DELETE /products/{product_id}` marks the product deleted first (Fleet.delete_product: its key stops
working then), then destroys its engines here, then removes its row. Each engine goes through the
ordinary destroy (claim, `destroy` audit as it enters `destroying`, backend, row), so a crash at any
point leaves what the reconciler already knows how to finish; the product row goes only once no engine
of any deployment is left, under the row lock provisions take, so no engine can be inserted meanwhile.

The reconciler (leader, each deployment) finishes the deletes nobody carries out any more
(`finish_product_deletes`): marked by a process that died, given up by the request (engines left), or past
the delete's deadline (an op's: boot timeout + stop grace + 30 s).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from bap_engine import audit, registry
from bap_engine.errors import BapError
from bap_engine.registry import EngineRow
from bap_engine.states import AuditAction

if TYPE_CHECKING:
    from bap_engine.lifecycle.lifecycle import Lifecycle

__all__ = ["destroy_product_engines", "remove_deleted_product", "finish_product_deletes"]

log = logging.getLogger("bap_engine.lifecycle")
_CONCURRENCY = 8  # engines destroyed at once
_RETRY_S = 0.1  # between passes over busy engines
_FOUND = "engine of a deleted product"


async def destroy_product_engines(lc: Lifecycle, product_id: str, *, actor: str, wait_s: float,
                                  found: str | None = None) -> int:
    """Destroy every engine of the product in this deployment, warm pool included, a few at a time.
    An engine busy with another op (or whose backend call failed) is tried again until `wait_s` has
    passed (0: one pass); engines that appear meanwhile (a provision that authenticated before the
    mark) are taken too. `found`: the reconciler's note for each destroy. Returns how many went."""
    deadline = time.monotonic() + wait_s
    gate = asyncio.Semaphore(_CONCURRENCY)
    destroyed = 0
    while True:
        async with lc.pool.acquire() as conn:
            rows = await registry.product_engines(conn, product_id, lc.settings.deployment)
        if not rows:
            return destroyed
        done = sum(await asyncio.gather(*(_destroy(lc, row, actor, found, gate) for row in rows)))
        destroyed += done
        if done == len(rows):
            continue  # re-read: anything inserted since
        if time.monotonic() >= deadline:
            return destroyed
        await asyncio.sleep(_RETRY_S)


async def _destroy(lc: Lifecycle, row: EngineRow, actor: str, found: str | None, gate: asyncio.Semaphore) -> int:
    async with gate:
        claim = await lc.tx.claim(row.id, "destroy")
        if claim is None:
            return 0  # busy (or already gone): the next pass sees
        try:
            async with claim:
                await lc.destroy_claimed(claim, actor=actor, found=found)
        except BapError as err:  # backend failure, or the op taken over: released, tried again
            log.warning("engine of a deleted product not destroyed yet",
                        extra={"product_id": row.product_id, "engine_id": row.id, "error": err.code})
            return 0
        return 1


async def remove_deleted_product(lc: Lifecycle, product_id: str, *, found: str | None = None) -> int | None:
    """Delete the deleted product's row (its webhook with it) if no engine of any deployment is left.
    Returns the engines left (0: the row is gone now), None when it was gone already. `found`: the
    reconciler's note (audited `reconcile` in the same transaction)."""
    async with lc.pool.acquire() as conn, conn.transaction():
        left = await registry.remove_deleted_product(conn, product_id)
        if left == 0 and found is not None:
            await audit.write(conn, AuditAction.RECONCILE, product_id=product_id,
                              metadata={"found": found, "done": "product removed"})
    return left


async def finish_product_deletes(lc: Lifecycle) -> int:
    """The reconciler's part: finish every delete no live process carries out. Returns the engines
    destroyed (the worker counts engines; a product row removed is audited, not counted)."""
    async with lc.pool.acquire() as conn:
        product_ids = await registry.deletes_to_finish(conn)
    destroyed = 0
    for product_id in product_ids:
        destroyed += await destroy_product_engines(lc, product_id, actor="system", wait_s=0, found=_FOUND)
        await remove_deleted_product(lc, product_id, found="a deleted product no process was deleting")
    return destroyed
