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
    """200 {"status": "ok"} when ready; 503 when Postgres does not answer, migrations are not
    applied, or a supervised task keeps failing (this replica cannot heal: take it out of rotation)."""
    if not await services.ready():
        return envelope(503, "SERVICE_UNAVAILABLE", "database unreachable or migrations not applied")
    failing = services.supervisor.failing()
    if failing:
        return envelope(503, "SERVICE_UNAVAILABLE", f"supervised tasks failing repeatedly: {', '.join(failing)}")
    return JSON({"status": "ok"})
