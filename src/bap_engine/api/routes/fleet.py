"""Fleet routes scoped to the calling product: list, status, metrics (X-Platform-Key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bap_engine.api.deps import FleetDep, ProductDep
from bap_engine.api.models import ErrorOut
from bap_engine.api.params import PageQuery
from bap_engine.api.responses import JSON
from bap_engine.api.routes.engines import engine_json

__all__ = ["router", "PageQueryDep"]

router = APIRouter(tags=["fleet"])
_ERRORS: dict[int | str, dict[str, object]] = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}}

PageQueryDep = Annotated[PageQuery, Query()]


@router.get("/engines", responses=_ERRORS)
async def list_engines(product: ProductDep, fleet: FleetDep, page: PageQueryDep) -> JSON:
    """The product's engines, oldest first, without keys."""
    views, total = await fleet.engines(product.id, page.status, page.limit, page.offset)
    return JSON({"engines": [engine_json(v, with_key=False) for v in views], "total": total})


@router.get("/status", responses=_ERRORS)
async def status(product: ProductDep, fleet: FleetDep) -> JSON:
    """Counts by state and an overall health verdict."""
    return JSON(await fleet.status(product.id))


@router.get("/metrics", responses=_ERRORS)
async def metrics(product: ProductDep, fleet: FleetDep) -> JSON:
    """Rolling-hour figures from the audit log."""
    return JSON(await fleet.metrics(product.id))
