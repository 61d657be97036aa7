"""Admin routes for operators (X-Admin-Key): products with their fleets, engines, metrics, the
audit trail, and engine actions on any product's engine (what the dashboard and the ops CLI use).

Nothing here returns a key: engine listings never do, and an admin rotate-key answers without the
new key (the product picks it up from admit or GET /engines/{user_id}). Actions are audited with
actor `admin` by lifecycle, and logged here as one JSON line each.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Security
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema

from bap_engine.api.deps import _ADMIN_KEY, AdminDep, FleetDep, LifecycleDep, PlatformKeyDep, ProductIdDep, UserIdDep
from bap_engine.api.models import USER_ID_PATTERN, iso
from bap_engine.api.params import ACTION_PATTERN, MAX_QUERY_INT, AuditQuery, QueryInt, QueryUuid
from bap_engine.api.responses import JSON
from bap_engine.api.routes.engines import engine_json
from bap_engine.api.routes.fleet import PageQueryDep
from bap_engine.api.routes.usage import QueryInstant
from bap_engine.errors import ValidationFailed
from bap_engine.fleet import ProductRow

__all__ = ["router", "boot_buckets", "BOOT_BUCKETS_MS", "AuditAnyQuery", "encode_cursor", "decode_cursor"]

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


async def _events(fleet: FleetDep, product_id: str | None, limit: int, action: str | None, after_id: int) -> JSON:
    rows = await fleet.audit_events(product_id, limit, action, after_id)
    return JSON({"events": [{"id": r.id, "timestamp": iso(r.timestamp), "product_id": r.product_id,
                             "user_id": r.user_id, "engine_id": r.engine_id, "action": r.action, "actor": r.actor,
                             "metadata": r.metadata, "duration_ms": r.duration_ms} for r in rows]})


@router.get("/products/{product_id}/audit")
async def product_audit(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep,
                        query: Annotated[AuditQuery, Query()]) -> JSON:
    """A product's audit events, newest first; with `after_id`, the ones after it oldest first."""
    product = await fleet.get_product(product_id)
    return await _events(fleet, product.id, query.limit, query.action, query.after_id)


_ADMIN_ONLY, _PLATFORM_ONLY = ("product_id", "after_id"), ("user_id", "engine_id", "since", "until", "cursor")
_ADMIN_LIMIT, _PLATFORM_LIMIT = 50, 100
# at most 18 digits: every cursor the pattern admits is a bigint
_CURSOR_PATTERN = r"^v1:[1-9][0-9]{0,17}$"
_CURSOR = re.compile(_CURSOR_PATTERN)


class AuditAnyQuery(BaseModel):
    """`GET /audit`: the operator's form (X-Admin-Key: `product_id`, `after_id`, `action`, `limit`) or a
    product's (X-Platform-Key: `user_id`, `engine_id`, `action`, `since`, `until`, `limit`, `cursor`).
    A parameter of the other form, like an unknown one, is 400 VALIDATION_ERROR."""

    model_config = ConfigDict(extra="forbid")

    # (the schema given: pydantic documents bounds inside an optional validated int as "ge"/"le")
    limit: Annotated[QueryInt | None, Field(ge=1, le=1000), WithJsonSchema(
        {"type": "integer", "minimum": 1, "maximum": 1000})] = Field(
        default=None, description=f"default {_ADMIN_LIMIT} (X-Admin-Key), {_PLATFORM_LIMIT} (X-Platform-Key)")
    action: str | None = Field(default=None, pattern=ACTION_PATTERN, description="an audit action name")
    after_id: QueryInt = Field(default=0, ge=0, le=MAX_QUERY_INT,
                               description="X-Admin-Key: the rows after this id, oldest first (tailing)")
    product_id: QueryUuid | None = Field(default=None, description="X-Admin-Key: only this product's rows")
    user_id: str | None = Field(default=None, pattern=USER_ID_PATTERN, description="X-Platform-Key: only this user's")
    engine_id: QueryUuid | None = Field(default=None, description="X-Platform-Key: only this engine's")
    since: QueryInstant | None = Field(default=None, description="X-Platform-Key: rows at or after this time")
    until: QueryInstant | None = Field(default=None, description="X-Platform-Key: rows before this time")
    cursor: str | None = Field(default=None, pattern=_CURSOR_PATTERN,
                               description="X-Platform-Key: the `next_cursor` of the previous page")


def encode_cursor(last_id: int) -> str:
    """Opaque to clients (pass it back as is): "v1:" and the last id returned."""
    return f"v1:{last_id}"


def decode_cursor(cursor: str) -> int:
    """The id a cursor continues before. Raises ValidationFailed unless it is one this API writes
    (the query model's pattern already refuses anything else: every cursor it lets through is read)."""
    if not _CURSOR.fullmatch(cursor):
        raise ValidationFailed("cursor: not a next_cursor this API returned")
    return int(cursor[3:])


async def audit_caller(fleet: FleetDep, admin_key: Annotated[str | None, Security(_ADMIN_KEY)],
                       platform_key: PlatformKeyDep) -> ProductRow | None:
    """None for the operator, else the product. An X-Admin-Key decides when present (admin wins):
    a wrong one is INVALID_ADMIN_KEY even beside a good platform key; with neither key, INVALID_ADMIN_KEY
    (what this route answered before it took platform keys); a wrong platform key alone,
    INVALID_PLATFORM_KEY."""
    if admin_key is not None or platform_key is None:
        fleet.check_admin(admin_key)
        return None
    return await fleet.authenticate(platform_key)


def _only(query: AuditAnyQuery, names: tuple[str, ...], key: str) -> None:
    given = sorted(set(names) & query.model_fields_set)
    if given:
        raise ValidationFailed(f"{given[0]}: only with {key}")


@router.get("/audit")
async def all_audit(caller: Annotated[ProductRow | None, Depends(audit_caller)], fleet: FleetDep,
                    query: Annotated[AuditAnyQuery, Query()]) -> JSON:
    """The audit log, for the operator or for one product.

    With X-Admin-Key (it wins when both keys are sent): every product's rows, or `product_id`'s, for
    `bap-engine audit tail`: newest first, or with `after_id` the rows after it oldest first;
    `{"events": [...]}` with each row's product_id (default limit 50).

    With X-Platform-Key: the product's rows, newest first, filtered by `user_id`, `engine_id`, `action`
    and [`since`, `until`) (ISO-8601 with Z or an offset), `limit` (default 100) a page, and
    `{"events": [...], "next_cursor": ...}`: pass `next_cursor` as `cursor` with the same filters for the
    next page (keyset on the row id: each row is seen once, rows written meanwhile only on a new first
    page); null on the last page. Denials (`admit_denied`, one row per reason and minute with a count)
    and `health_check` rows are included."""
    if caller is None:
        _only(query, _PLATFORM_ONLY, "X-Platform-Key")
        product_id = None if query.product_id is None else (await fleet.get_product(query.product_id)).id
        return await _events(fleet, product_id, query.limit or _ADMIN_LIMIT, query.action, query.after_id)
    _only(query, _ADMIN_ONLY, "X-Admin-Key")
    rows, last = await fleet.audit_page(
        caller.id, query.limit or _PLATFORM_LIMIT, before_id=None if query.cursor is None else decode_cursor(
            query.cursor), user_id=query.user_id, engine_id=query.engine_id, action=query.action,
        since=query.since, until=query.until)
    return JSON({"events": [{"id": r.id, "timestamp": iso(r.timestamp), "action": r.action, "user_id": r.user_id,
                             "engine_id": r.engine_id, "actor": r.actor, "metadata": r.metadata,
                             "duration_ms": r.duration_ms} for r in rows],
                 "next_cursor": None if last is None else encode_cursor(last)})


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
