"""Admin routes (X-Admin-Key): products — registration, policy, reading, deletion and platform-key rotation."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Body
from pydantic import BaseModel, ConfigDict, Field, field_validator

from bap_engine.api.deps import AdminDep, FleetDep, LifecycleDep, ProductIdDep
from bap_engine.api.models import ErrorOut, PolicyBody, RegisterBody, iso
from bap_engine.api.responses import JSON
from bap_engine.fleet import MAX_KEY_OVERLAP_S

__all__ = ["router", "RotatePlatformKeyBody"]

log = logging.getLogger("bap_engine.ops")
router = APIRouter(tags=["admin"])
_ERRORS: dict[int | str, dict[str, object]] = {c: {"model": ErrorOut} for c in (400, 401, 404, 409, 503)}


class RotatePlatformKeyBody(BaseModel):
    """Strict, as api/models.py's bodies: "5" is not an integer here, unknown fields are 400. An empty
    body is this with its defaults."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{"overlap_seconds": 300}]})

    overlap_seconds: int = Field(default=0, ge=0, le=MAX_KEY_OVERLAP_S,
                                 description="how long the replaced key keeps working (0: refused at once)")

    @field_validator("overlap_seconds", mode="before")
    @classmethod
    def _whole(cls, value: object) -> object:
        # JSON (and the documented schema's `integer`) does not tell 300 from 300.0; 1.5 stays refused
        return int(value) if isinstance(value, float) and value.is_integer() else value


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


@router.get("/products/{product_id}", responses=_ERRORS)
async def get_product(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep) -> JSON:
    """The product and its engine count (warm pool included); 404 while it is being deleted."""
    product, engines = await fleet.product_detail(product_id)
    return JSON({"product_id": product.id, "slug": product.slug, "display_name": product.display_name,
                 "policy": product.policy, "created_at": iso(product.created_at), "engines": engines})


@router.delete("/products/{product_id}", responses=_ERRORS)
async def delete_product(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep, lifecycle: LifecycleDep) -> JSON:
    """Delete the product with every engine (warm pool included): its platform key stops working as the
    delete starts. 200 once everything is gone; 503 when engines are left (busy past the boot timeout,
    failing, or of another deployment): the product stays deleted, the reconciler finishes, and DELETE
    again takes the deletion up where it is."""
    destroyed = await fleet.delete_product(product_id, lifecycle)
    log.info("admin product action", extra={"action": "product_delete", "product_id": product_id,
                                            "engines_destroyed": destroyed, "actor": "admin"})
    return JSON({"status": "deleted", "product_id": product_id, "engines_destroyed": destroyed})


@router.post("/products/{product_id}/rotate-platform-key", responses=_ERRORS)
async def rotate_platform_key(_: AdminDep, product_id: ProductIdDep, fleet: FleetDep,
                              body: Annotated[RotatePlatformKeyBody | None, Body()] = None) -> JSON:
    """A new platform key, shown once; the old one keeps working for `overlap_seconds` (default 0),
    on every replica. Rotating again within the overlap drops the oldest key at once."""
    overlap = (body or RotatePlatformKeyBody()).overlap_seconds
    key = await fleet.rotate_platform_key(product_id, overlap)
    log.info("admin product action", extra={"action": "platform_key_rotate", "product_id": product_id,
                                            "overlap_seconds": overlap, "actor": "admin"})
    return JSON({"product_id": product_id, "platform_api_key": key})
