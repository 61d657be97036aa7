"""Admin routes for operators (X-Admin-Key): products with their fleets, engines, metrics, the
audit trail, and engine actions on any product's engine (what the dashboard and the ops CLI use).

Nothing here returns a key: engine listings never do, and an admin rotate-key answers without the
new key (the product picks it up from admit or GET /engines/{user_id}). Actions are audited with
actor `admin` by lifecycle, and logged here as one JSON line each.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query

from bap_engine.api.deps import AdminDep, FleetDep, LifecycleDep, ProductIdDep, UserIdDep
from bap_engine.api.models import iso
from bap_engine.api.params import AdminAuditQuery, AuditQuery
from bap_engine.api.responses import JSON
from bap_engine.api.routes.engines import engine_json
from bap_engine.api.routes.fleet import PageQueryDep

__all__ = ["router", "boot_buckets", "BOOT_BUCKETS_MS"]

log = logging.getLogger("bap_engine.ops")
router = APIRouter(tags=["ops"])
BOOT_BUCKETS_MS = (250, 500, 1000, 2000, 5000, 10_000, 30_000)
_BOOT_SAMPLES = 200


def boot_buckets(durations: list[int]) -> dict[str, object]:
    """Non-cumulative counts of boot durations per bound (the last bucket, le=null, is the rest)."""
    counts = [0] * (len(BOOT_BUCKETS_MS) + 1)
    for ms in durations:
        counts[next((i for i, b in enumerate(BOOT_BUCKETS_MS) if ms <= b), len(BOOT_BUCKETS_MS))] += 1
    bounds: list[int | None] = [*BOOT_BUCKETS_MS, None]
    return {"buckets": [{"le": b, "count": n} for b, n in zip(bounds, counts, strict=True)], "samples": len(durations)}


@router.get("/products")
async def list_products(_: AdminDep, fleet: FleetDep) -> JSON:
    """Every product with its engines counted by state."""
    out = [{"product_id": p.id, "slug": p.slug, "display_name": p.display_name, "policy": p.policy,
            "created_at": iso(p.created_at), "by_status": counts, "total": sum(counts.values())}
           for p, counts in await fleet.products()]
    return JSON({"products": out})


@router.get("/products/{product_id}/engines")
async def product_engines(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep, page: PageQueryDep) -> JSON:
    """A product's engines, oldest first, without keys (`status`, `limit`, `offset` as GET /engines)."""
    product = await fleet.get_product(product_id)
    views, total = await fleet.engines(product.id, page.status, page.limit, page.offset)
    return JSON({"engines": [engine_json(v, with_key=False) for v in views], "total": total})


@router.get("/products/{product_id}/engines/{user_id}")
async def product_engine(_: AdminDep, product_id: ProductIdDep, user_id: UserIdDep, fleet: FleetDep,
                         lifecycle: LifecycleDep) -> JSON:
    """One engine of a product, without its key."""
    product = await fleet.get_product(product_id)
    return JSON(engine_json(await lifecycle.engine_view(product, user_id), with_key=False))


@router.get("/products/{product_id}/metrics")
async def product_metrics(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep) -> JSON:
    """GET /metrics for one product, plus the boot-time distribution of its last 200 provisions."""
    product = await fleet.get_product(product_id)
    figures = await fleet.metrics(product.id)
    rows = await fleet.audit_events(product.id, _BOOT_SAMPLES, "provision")
    return JSON({**figures, "boot_ms": boot_buckets([r.duration_ms for r in rows if r.duration_ms is not None])})


async def _events(fleet: FleetDep, product_id: str | None, query: AuditQuery) -> JSON:
    rows = await fleet.audit_events(product_id, query.limit, query.action, query.after_id)
    return JSON({"events": [{"id": r.id, "timestamp": iso(r.timestamp), "product_id": r.product_id,
                             "user_id": r.user_id, "engine_id": r.engine_id, "action": r.action, "actor": r.actor,
                             "metadata": r.metadata, "duration_ms": r.duration_ms} for r in rows]})


@router.get("/products/{product_id}/audit")
async def product_audit(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep,
                        query: Annotated[AuditQuery, Query()]) -> JSON:
    """A product's audit events, newest first; with `after_id`, the ones after it oldest first."""
    product = await fleet.get_product(product_id)
    return await _events(fleet, product.id, query)


@router.get("/audit")
async def all_audit(_: AdminDep, fleet: FleetDep, query: Annotated[AdminAuditQuery, Query()]) -> JSON:
    """Audit events of every product (or of `product_id`), for `bap-engine audit tail`."""
    product_id = None if query.product_id is None else (await fleet.get_product(query.product_id)).id
    return await _events(fleet, product_id, query)


def _done(action: str, product_id: str, user_id: str, engine_id: str, status: str, url: str | None) -> JSON:
    log.info("admin engine action", extra={"action": action, "product_id": product_id, "user_id": user_id,
                                           "engine_id": engine_id, "actor": "admin"})
    return JSON({"engine_id": engine_id, "user_id": user_id, "status": status, "url": url})


@router.post("/products/{product_id}/engines/{user_id}/stop")
async def admin_stop(_: AdminDep, product_id: ProductIdDep, user_id: UserIdDep, fleet: FleetDep,
                     lifecycle: LifecycleDep) -> JSON:
    """Stop any product's engine (data kept)."""
    row = await lifecycle.stop(await fleet.get_product(product_id), user_id, actor="admin")
    return _done("stop", product_id, user_id, row.id, "stopped", row.url)


@router.post("/products/{product_id}/engines/{user_id}/start")
async def admin_start(_: AdminDep, product_id: ProductIdDep, user_id: UserIdDep, fleet: FleetDep,
                      lifecycle: LifecycleDep) -> JSON:
    """Start a stopped, sleeping or failed engine and wait until healthy."""
    row = await lifecycle.start(await fleet.get_product(product_id), user_id, actor="admin")
    return _done("start", product_id, user_id, row.id, "running", row.url)


@router.post("/products/{product_id}/engines/{user_id}/rotate-key")
async def admin_rotate_key(_: AdminDep, product_id: ProductIdDep, user_id: UserIdDep, fleet: FleetDep,
                           lifecycle: LifecycleDep) -> JSON:
    """Rotate a running engine's key; the new key is not returned here."""
    row, _key = await lifecycle.rotate_key(await fleet.get_product(product_id), user_id, actor="admin")
    return _done("rotate_key", product_id, user_id, row.id, str(row.status), row.url)


@router.delete("/products/{product_id}/engines/{user_id}")
async def admin_destroy(_: AdminDep, product_id: ProductIdDep, user_id: UserIdDep, fleet: FleetDep,
                        lifecycle: LifecycleDep) -> JSON:
    """Destroy an engine with its data."""
    engine_id = await lifecycle.destroy(await fleet.get_product(product_id), user_id, actor="admin")
    return _done("destroy", product_id, user_id, engine_id, "destroyed", None)
