"""Fleet: products, their engines in aggregate, status, metrics and the audit trail.

Read-mostly service over the registry and the audit log; product registration, policy
changes, platform-key rotation and product deletion are written here with their audit rows
(deletion destroys the engines through lifecycle/products.py).
"""

from __future__ import annotations

import contextlib
import hmac
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime

import asyncpg

from bap_engine import audit, registry
from bap_engine.audit import COUNTED_ACTIONS, ActionTotal, AuditRow, AuditTotals
from bap_engine.errors import (
    InvalidAdminKey,
    InvalidPlatformKey,
    ProductNotFound,
    ProductSlugExists,
    ServiceUnavailable,
    ValidationFailed,
)
from bap_engine.keys import hash_key, new_platform_key
from bap_engine.lifecycle import EngineView, Lifecycle, destroy_product_engines, remove_deleted_product, view
from bap_engine.policy import parse_policy
from bap_engine.registry import ProductRow
from bap_engine.states import AuditAction, EngineState

__all__ = ["Fleet", "ProductRow", "health_of", "AuditTotals", "ActionTotal", "COUNTED_ACTIONS",
           "MAX_KEY_OVERLAP_S"]

MAX_KEY_OVERLAP_S = 86_400  # a replaced platform key works at most a day longer


def health_of(total: int, failed: int) -> str:
    """ok with no failed engine, critical at >= 10 % failed (and >= 1), else degraded."""
    if failed == 0:
        return "ok"
    return "critical" if failed * 10 >= total else "degraded"


# Audit actions whose totals (and durations) the Prometheus endpoint exposes.
class Fleet:
    def __init__(self, pool: asyncpg.Pool, admin_key: str,
                 check_version: Callable[[str], Awaitable[None]] | None = None) -> None:
        """`check_version` refuses a policy pinning an `engine_version` the backend does not know
        (raises ValidationFailed); without it any version is stored."""
        self._pool = pool
        self._admin_key = admin_key
        self._check_version = check_version

    async def _check_policy(self, policy: dict[str, object]) -> None:
        version = parse_policy(policy).engine_version
        if version is not None and self._check_version is not None:
            await self._check_version(version)

    def check_admin(self, key: str | None) -> None:
        """Raises InvalidAdminKey."""
        if not key or not hmac.compare_digest(key.encode(), self._admin_key.encode()):
            raise InvalidAdminKey()

    async def authenticate(self, platform_key: str | None) -> ProductRow:
        """The product owning this platform key. Raises InvalidPlatformKey."""
        if not platform_key:
            raise InvalidPlatformKey()
        async with self._pool.acquire() as conn:
            product = await registry.get_product_by_key_hash(conn, hash_key(platform_key))
        if product is None:
            raise InvalidPlatformKey()
        return product

    async def register_product(
        self, slug: str, display_name: str, policy: dict[str, object]
    ) -> tuple[ProductRow, str]:
        """Returns (product, platform key shown once). Raises ProductSlugExists, ValidationFailed."""
        await self._check_policy(policy)
        key = new_platform_key()
        async with self._pool.acquire() as conn, conn.transaction():
            product = await registry.insert_product(conn, str(uuid.uuid4()), slug, display_name, hash_key(key), policy)
            if product is None:
                raise ProductSlugExists()
            await audit.write(conn, AuditAction.POLICY_REGISTER, product_id=product.id, actor="admin",
                              metadata={"slug": slug, "policy": policy})
        return product, key

    async def update_policy(self, product_id: str, policy: dict[str, object]) -> ProductRow:
        """Replace the whole policy. Raises ProductNotFound, ValidationFailed."""
        await self._check_policy(policy)
        async with self._pool.acquire() as conn, conn.transaction():
            product = await registry.set_policy(conn, product_id, policy)
            if product is None:
                raise ProductNotFound()
            await audit.write(conn, AuditAction.POLICY_UPDATE, product_id=product_id, actor="admin",
                              metadata={"policy": policy})
        return product

    async def products(self) -> list[tuple[ProductRow, dict[str, int]]]:
        async with self._pool.acquire() as conn:
            products = await registry.list_products(conn)
            counts = await registry.count_by_product_status(conn)
        by_product: dict[str, dict[str, int]] = {p.id: _all_states() for p in products}
        for product_id, status, n in counts:
            by_product.setdefault(product_id, _all_states())[status] = n
        return [(p, by_product[p.id]) for p in products]

    async def get_product(self, product_id: str) -> ProductRow:
        async with self._pool.acquire() as conn:
            product = await registry.get_product(conn, product_id)
        if product is None:
            raise ProductNotFound()
        return product

    async def product_detail(self, product_id: str) -> tuple[ProductRow, int]:
        """The product and its engine count (warm pool included). Raises ProductNotFound (also while
        it is being deleted)."""
        async with self._pool.acquire() as conn:
            product = await registry.get_product(conn, product_id)
            if product is None:
                raise ProductNotFound()
            return product, await registry.count_engines(conn, product_id)

    async def rotate_platform_key(self, product_id: str, overlap_s: int) -> str:
        """A new platform key (returned, shown once); the replaced one keeps working `overlap_s`
        seconds (0: refused at once), checked against Postgres' clock by every replica. A key an
        earlier rotation kept valid is dropped at once. Audited `platform_key_rotate` (never a key).
        Raises ProductNotFound, ValidationFailed."""
        if not 0 <= overlap_s <= MAX_KEY_OVERLAP_S:
            raise ValidationFailed(f"overlap_seconds must be between 0 and {MAX_KEY_OVERLAP_S}")
        key = new_platform_key()
        async with self._pool.acquire() as conn, conn.transaction():
            if not await registry.rotate_product_key(conn, product_id, hash_key(key), overlap_s):
                raise ProductNotFound()
            await audit.write(conn, AuditAction.PLATFORM_KEY_ROTATE, product_id=product_id, actor="admin",
                              metadata={"overlap_seconds": overlap_s})
        return key

    async def delete_product(self, product_id: str, lifecycle: Lifecycle) -> int:
        """Delete the product: marked deleted first, with its `product_delete` audit row (from then on
        its platform key works nowhere and it is not found), then every engine destroyed (warm pool
        included; busy ones waited for up to the boot timeout), then its row (its webhook with it; the
        audit trail stays). Returns the engines this call destroyed.

        A product already being deleted (an earlier call answered 503, or is still running) is taken
        up where it is. Raises ProductNotFound; ServiceUnavailable when engines are left (busy beyond
        the wait, a backend failure, or of another deployment): the product stays deleted and the
        reconciler finishes; calling again waits for it."""
        async with self._pool.acquire() as conn, conn.transaction():
            marked = await registry.mark_product_deleted(conn, product_id, lifecycle.owner_id,
                                                         lifecycle.tx.op_ttl_s)
            if marked is None:
                raise ProductNotFound()
            product, first = marked
            if first:
                engines = await registry.count_engines(conn, product_id)
                await audit.write(conn, AuditAction.PRODUCT_DELETE, product_id=product_id, actor="admin",
                                  metadata={"slug": product.slug, "engines": engines})
        try:
            destroyed = await destroy_product_engines(lifecycle, product_id, actor="admin",
                                                      wait_s=lifecycle.settings.boot_timeout_s)
            left = await remove_deleted_product(lifecycle, product_id)
        except BaseException:  # a lost database, a cancelled request: the reconciler's now
            with contextlib.suppress(Exception):
                await self._release_delete(product_id, lifecycle.owner_id)
            raise
        if left:
            await self._release_delete(product_id, lifecycle.owner_id)
            raise ServiceUnavailable(
                f"the product is deleted (its platform key no longer works) but {left} of its engines are not "
                "destroyed yet (busy, failing, or of another deployment); the reconciler finishes the deletion "
                "and DELETE again waits for it")
        return destroyed

    async def _release_delete(self, product_id: str, owner: int) -> None:
        async with self._pool.acquire() as conn:
            await registry.release_product_delete(conn, product_id, owner)

    async def engines(
        self, product_id: str, status: str | None, limit: int, offset: int
    ) -> tuple[list[EngineView], int]:
        async with self._pool.acquire() as conn:
            rows, total = await registry.list_engines(conn, product_id, status, limit, offset)
        return [view(r) for r in rows], total

    async def status(self, product_id: str) -> dict[str, object]:
        async with self._pool.acquire() as conn:
            counts = await registry.count_by_status(conn, product_id)
            warm = await registry.count_warm(conn, product_id)
        by_status = {**_all_states(), **counts}
        total = sum(by_status.values())
        failed = by_status[EngineState.FAILED]
        return {"total": total, "by_status": by_status, "health": health_of(total, failed),
                "unhealthy_count": failed, "warm": warm}

    async def metrics(self, product_id: str) -> dict[str, object]:
        async with self._pool.acquire() as conn:
            return await audit.metrics(conn, product_id)

    async def audit_events(
        self, product_id: str | None, limit: int, action: str | None = None, after_id: int = 0
    ) -> list[AuditRow]:
        async with self._pool.acquire() as conn:
            return await audit.recent(conn, product_id, limit, action, after_id)

    async def audit_page(
        self, product_id: str, limit: int, *, before_id: int | None = None, user_id: str | None = None,
        engine_id: str | None = None, action: str | None = None, since: datetime | None = None,
        until: datetime | None = None,
    ) -> tuple[list[AuditRow], int | None]:
        """One page of a product's audit rows, newest first, and the id to continue before (None on the
        last page: one row more than `limit` is read to know)."""
        async with self._pool.acquire() as conn:
            rows = await audit.page(conn, product_id, limit + 1, before_id=before_id, user_id=user_id,
                                    engine_id=engine_id, action=action, since=since, until=until)
        return rows[:limit], rows[limit - 1].id if len(rows) > limit else None

    async def state_seconds(self) -> list[tuple[str, str, float]]:
        """(product id, state, seconds) spent in each state by the non-pool engines, closed and open."""
        async with self._pool.acquire() as conn:
            return await audit.state_seconds(conn)

    async def pool_counts(self) -> list[tuple[str, str, int]]:
        """Warm-pool engines by product and status (not in the products' own counts)."""
        async with self._pool.acquire() as conn:
            return await registry.count_pool_by_product(conn)

    async def count_by_product_status(self) -> list[tuple[str, str, int]]:
        async with self._pool.acquire() as conn:
            return await registry.count_by_product_status(conn)

    async def audit_totals(self, bounds_ms: Sequence[int]) -> AuditTotals:
        """All-time per-product action totals and denials from the audit log (same on every replica)."""
        async with self._pool.acquire() as conn:
            return await audit.totals(conn, bounds_ms)


def _all_states() -> dict[str, int]:
    return {str(s): 0 for s in EngineState}
