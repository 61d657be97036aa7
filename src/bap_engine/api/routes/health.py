"""GET /health: up, Postgres answers, migrations applied (no auth)."""

from __future__ import annotations

from fastapi import APIRouter

from bap_engine.api.deps import ServicesDep
from bap_engine.api.errors import envelope
from bap_engine.api.responses import JSON

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/health")
async def health(services: ServicesDep) -> object:
    """200 {"status": "ok"} when ready, 503 otherwise."""
    if await services.ready():
        return JSON({"status": "ok"})
    return envelope(503, "SERVICE_UNAVAILABLE", "database unreachable or migrations not applied")
