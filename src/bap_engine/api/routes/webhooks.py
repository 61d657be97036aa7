"""Admin routes (X-Admin-Key): a product's webhook, the receiver of its lifecycle events.

    PUT    /products/{product_id}/webhook   {"url"} → {"url", "secret"} (the secret is shown once)
    GET    /products/{product_id}/webhook   → {"url", "pending", "last_status", "last_delivery_at"}
    DELETE /products/{product_id}/webhook   → {"status": "deleted"}

Delivery is the leader's webhook worker (workers/webhooks.py); these routes only read and write the
webhook's row, so none of them waits for a receiver. Nothing here logs or echoes the secret but the
PUT's answer.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from bap_engine.api.deps import AdminDep, ProductIdDep, ServicesDep
from bap_engine.api.models import ErrorOut
from bap_engine.api.responses import JSON
from bap_engine.errors import ServiceUnavailable
from bap_engine.webhooks import MAX_URL, URL_PATTERN, Webhooks, iso_z

__all__ = ["router", "WebhookBody"]

router = APIRouter(tags=["admin"])
_ERRORS: dict[int | str, dict[str, object]] = {c: {"model": ErrorOut} for c in (400, 401, 404)}


class WebhookBody(BaseModel):
    """Strict, as api/models.py's bodies: "5" is not a string here, unknown fields are 400."""

    model_config = ConfigDict(extra="forbid", strict=True,
                              json_schema_extra={"examples": [{"url": "https://example.com/hooks/bap"}]})

    url: str = Field(max_length=MAX_URL, pattern=URL_PATTERN,
                     description="where events are POSTed: http(s), a host, at most 2000 characters")


async def get_webhooks(services: ServicesDep) -> Webhooks:
    if services.webhooks is None:
        raise ServiceUnavailable("webhooks are not available")
    return services.webhooks


WebhooksDep = Annotated[Webhooks, Depends(get_webhooks)]


@router.put("/products/{product_id}/webhook", responses=_ERRORS)
async def put_webhook(_: AdminDep, product_id: ProductIdDep, body: WebhookBody, webhooks: WebhooksDep) -> JSON:
    """Set the product's webhook, with a new signing secret shown once (an existing webhook keeps its
    place in the event stream: nothing is skipped nor sent again)."""
    created = await webhooks.put(product_id, body.url)
    return JSON({"url": created.url, "secret": created.secret})


@router.get("/products/{product_id}/webhook", responses=_ERRORS)
async def get_webhook(_: AdminDep, product_id: ProductIdDep, webhooks: WebhooksDep) -> JSON:
    """The product's webhook and its delivery state, without the secret (`pending`: events not yet
    acknowledged, counted up to 10000)."""
    status = await webhooks.status(product_id)
    return JSON({"url": status.url, "pending": status.pending, "last_status": status.last_status,
                 "last_delivery_at": iso_z(status.last_delivery_at)})


@router.delete("/products/{product_id}/webhook", responses=_ERRORS)
async def delete_webhook(_: AdminDep, product_id: ProductIdDep, webhooks: WebhooksDep) -> JSON:
    """Remove the product's webhook: no more events are sent to it."""
    await webhooks.delete(product_id)
    return JSON({"status": "deleted"})
