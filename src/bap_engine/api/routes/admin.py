"""Admin routes (X-Admin-Key): product registration and policy."""

from __future__ import annotations

from fastapi import APIRouter

from bap_engine.api.deps import AdminDep, FleetDep, ProductIdDep
from bap_engine.api.models import ErrorOut, PolicyBody, RegisterBody
from bap_engine.api.responses import JSON

__all__ = ["router"]

router = APIRouter(tags=["admin"])
_ERRORS: dict[int | str, dict[str, object]] = {c: {"model": ErrorOut} for c in (400, 401, 404, 409)}


@router.post("/products/register", responses=_ERRORS)
async def register(body: RegisterBody, _: AdminDep, fleet: FleetDep) -> JSON:
    """Register a product; its platform key is shown once."""
    product, key = await fleet.register_product(body.slug, body.display_name, body.policy)
    return JSON({"product_id": product.id, "slug": product.slug, "platform_api_key": key})


@router.put("/products/{product_id}/policy", responses=_ERRORS)
async def set_policy(_: AdminDep, product_id: ProductIdDep, body: PolicyBody, fleet: FleetDep) -> JSON:
    """Replace the whole policy (tightening max_engines destroys nothing)."""
    product = await fleet.update_policy(product_id, body.policy)
    return JSON({"policy": product.policy})
