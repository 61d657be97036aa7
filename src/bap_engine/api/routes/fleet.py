"""Fleet routes scoped to the calling product: list, status, metrics (X-Platform-Key)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from bap_engine.api.deps import FleetDep, ProductDep
from bap_engine.api.models import ErrorOut
from bap_engine.api.responses import JSON
from bap_engine.api.routes.engines import engine_json
from bap_engine.errors import ValidationFailed
from bap_engine.states import EngineState

__all__ = ["router", "page_params"]

router = APIRouter(tags=["fleet"])
_ERRORS: dict[int | str, dict[str, object]] = {400: {"model": ErrorOut}, 401: {"model": ErrorOut}}
_STATES = {str(s) for s in EngineState}


def _int(raw: str | None, name: str, default: int, low: int, high: int | None) -> int:
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValidationFailed(f"{name} must be an integer")
    value = int(raw)
    if value < low or (high is not None and value > high):
        raise ValidationFailed(f"{name} must be between {low} and {high}" if high else f"{name} must be >= {low}")
    return value


def page_params(request: Request) -> tuple[str | None, int, int]:
    """(status, limit, offset) from the query string. Raises ValidationFailed."""
    q = request.query_params
    unknown = set(q) - {"status", "limit", "offset"}
    if unknown:
        raise ValidationFailed(f"unknown query parameter: {sorted(unknown)[0]}")
    status = q.get("status") or None
    if status is not None and status not in _STATES:
        raise ValidationFailed(f"status must be one of {sorted(_STATES)}")
    return status, _int(q.get("limit"), "limit", 100, 1, 1000), _int(q.get("offset"), "offset", 0, 0, None)


@router.get("/engines", responses=_ERRORS)
async def list_engines(request: Request, product: ProductDep, fleet: FleetDep,
                       status: str | None = None, limit: int = 100, offset: int = 0) -> JSON:
    """The product's engines, oldest first, without keys."""
    status, limit, offset = page_params(request)
    views, total = await fleet.engines(product.id, status, limit, offset)
    return JSON({"engines": [engine_json(v, with_key=False) for v in views], "total": total})


@router.get("/status", responses=_ERRORS)
async def status(product: ProductDep, fleet: FleetDep) -> JSON:
    """Counts by state and an overall health verdict."""
    return JSON(await fleet.status(product.id))


@router.get("/metrics", responses=_ERRORS)
async def metrics(product: ProductDep, fleet: FleetDep) -> JSON:
    """Rolling-hour figures from the audit log."""
    return JSON(await fleet.metrics(product.id))
