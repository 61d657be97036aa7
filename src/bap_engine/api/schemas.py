"""Response models for the OpenAPI document, and which error codes each endpoint can answer.

The routes build their JSON by hand (orjson, no response validation on the hot path); these models
describe those shapes for `/openapi.json`, and `ENDPOINTS` lists each endpoint's error codes by
HTTP status, as in spec/API.md. `api/openapi.py` applies both to the generated document.
"""

from __future__ import annotations

from pydantic import BaseModel

from bap_engine.api.models import AdmitOut, EngineListItem, EngineOut

__all__ = [
    "ProvisionOut", "DestroyOut", "StartOut", "StopOut", "EngineListOut", "StatusOut", "MetricsOut",
    "RegisterOut", "PolicyOut", "HealthOut", "ProductOut", "ProductsOut", "BootBucketOut", "BootOut",
    "ProductMetricsOut", "AuditEventOut", "AuditOut", "AdminActionOut", "ENDPOINTS", "COMMON_ERRORS",
]


class ProvisionOut(BaseModel):
    """The engine and its key (provision, rotate-key)."""

    engine_id: str
    user_id: str
    status: str
    url: str | None
    api_key: str


class DestroyOut(BaseModel):
    status: str
    engine_id: str


class StartOut(BaseModel):
    status: str
    url: str | None
    engine_id: str


class StopOut(BaseModel):
    status: str
    engine_id: str


class EngineListOut(BaseModel):
    engines: list[EngineListItem]
    total: int


class StatusOut(BaseModel):
    total: int
    by_status: dict[str, int]
    health: str
    unhealthy_count: int


class MetricsOut(BaseModel):
    provisions_1h: int
    crashes_1h: int
    restarts_1h: int
    avg_boot_ms: float | None
    total_provisions: int
    total_destroys: int


class RegisterOut(BaseModel):
    product_id: str
    slug: str
    platform_api_key: str


class PolicyOut(BaseModel):
    policy: dict[str, object]


class HealthOut(BaseModel):
    status: str


class ProductOut(BaseModel):
    product_id: str
    slug: str
    display_name: str
    policy: dict[str, object]
    created_at: str | None
    by_status: dict[str, int]
    total: int


class ProductsOut(BaseModel):
    products: list[ProductOut]


class BootBucketOut(BaseModel):
    """Provisions whose boot took at most `le` ms (null: longer than the last bound); not cumulative."""

    le: int | None
    count: int


class BootOut(BaseModel):
    buckets: list[BootBucketOut]
    samples: int


class ProductMetricsOut(MetricsOut):
    boot_ms: BootOut


class AuditEventOut(BaseModel):
    id: int
    timestamp: str | None
    product_id: str | None
    user_id: str | None
    engine_id: str | None
    action: str
    actor: str
    metadata: dict[str, object]
    duration_ms: int | None


class AuditOut(BaseModel):
    events: list[AuditEventOut]


class AdminActionOut(BaseModel):
    """An admin action's result; never carries a key (the product gets a rotated key from admit/get)."""

    engine_id: str
    user_id: str
    status: str
    url: str | None


V, PK, AK = "VALIDATION_ERROR", "INVALID_PLATFORM_KEY", "INVALID_ADMIN_KEY"
BUSY, BACKEND, BOOT = "ENGINE_BUSY", "BACKEND_ERROR", "BOOT_TIMEOUT"
Errors = dict[int, tuple[str, ...]]

# Every endpoint may also answer 500 INTERNAL_ERROR; those with a body 413 PAYLOAD_TOO_LARGE.
COMMON_ERRORS: Errors = {500: ("INTERNAL_ERROR",)}

_ADMIN_ENGINE: Errors = {400: (V,), 401: (AK,), 404: ("PRODUCT_NOT_FOUND", "ENGINE_NOT_FOUND")}

# (method, path) → (200 model or None for a non-JSON answer, errors by status)
ENDPOINTS: dict[tuple[str, str], tuple[type[BaseModel] | None, Errors]] = {
    ("get", "/health"): (HealthOut, {503: ("SERVICE_UNAVAILABLE",)}),
    ("post", "/engines/provision"): (ProvisionOut, {
        400: (V,), 401: (PK,), 409: ("ENGINE_ALREADY_EXISTS", BUSY), 413: ("PAYLOAD_TOO_LARGE",),
        429: ("QUOTA_EXCEEDED",), 502: (BACKEND,), 503: ("PORT_EXHAUSTION", "SERVICE_UNAVAILABLE"), 504: (BOOT,)}),
    ("delete", "/engines/{user_id}"): (DestroyOut, {
        400: (V,), 401: (PK,), 404: ("ENGINE_NOT_FOUND",), 409: (BUSY,), 502: (BACKEND,)}),
    ("post", "/engines/{user_id}/start"): (StartOut, {
        400: (V,), 401: (PK,), 404: ("ENGINE_NOT_FOUND",), 409: ("ENGINE_ALREADY_RUNNING", BUSY),
        502: (BACKEND,), 504: (BOOT,)}),
    ("post", "/engines/{user_id}/stop"): (StopOut, {
        400: (V,), 401: (PK,), 404: ("ENGINE_NOT_FOUND",), 409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)}),
    ("post", "/engines/{user_id}/rotate-key"): (ProvisionOut, {
        400: (V,), 401: (PK,), 404: ("ENGINE_NOT_FOUND",), 409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)}),
    ("get", "/engines/{user_id}"): (EngineOut, {400: (V,), 401: (PK,), 404: ("ENGINE_NOT_FOUND",)}),
    ("post", "/engines/{user_id}/admit"): (AdmitOut, {
        400: (V,), 401: (PK,), 409: (BUSY,), 413: ("PAYLOAD_TOO_LARGE",), 429: ("RATE_LIMITED", "QUOTA_EXCEEDED"),
        502: (BACKEND,), 503: ("PORT_EXHAUSTION",), 504: (BOOT,)}),
    ("get", "/engines"): (EngineListOut, {400: (V,), 401: (PK,)}),
    ("get", "/status"): (StatusOut, {401: (PK,)}),
    ("get", "/metrics"): (MetricsOut, {401: (PK,)}),
    ("post", "/products/register"): (RegisterOut, {
        400: (V,), 401: (AK,), 409: ("PRODUCT_SLUG_EXISTS",), 413: ("PAYLOAD_TOO_LARGE",)}),
    ("put", "/products/{product_id}/policy"): (PolicyOut, {
        400: (V,), 401: (AK,), 404: ("PRODUCT_NOT_FOUND",), 413: ("PAYLOAD_TOO_LARGE",)}),
    ("get", "/products"): (ProductsOut, {401: (AK,)}),
    ("get", "/products/{product_id}/engines"): (EngineListOut, {400: (V,), 401: (AK,), 404: ("PRODUCT_NOT_FOUND",)}),
    ("get", "/products/{product_id}/engines/{user_id}"): (EngineListItem, _ADMIN_ENGINE),
    ("get", "/products/{product_id}/metrics"): (ProductMetricsOut, {401: (AK,), 404: ("PRODUCT_NOT_FOUND",)}),
    ("get", "/products/{product_id}/audit"): (AuditOut, {400: (V,), 401: (AK,), 404: ("PRODUCT_NOT_FOUND",)}),
    ("get", "/audit"): (AuditOut, {400: (V,), 401: (AK,)}),
    ("post", "/products/{product_id}/engines/{user_id}/stop"): (AdminActionOut, {
        **_ADMIN_ENGINE, 409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)}),
    ("post", "/products/{product_id}/engines/{user_id}/start"): (AdminActionOut, {
        **_ADMIN_ENGINE, 409: ("ENGINE_ALREADY_RUNNING", BUSY), 502: (BACKEND,), 504: (BOOT,)}),
    ("post", "/products/{product_id}/engines/{user_id}/rotate-key"): (AdminActionOut, {
        **_ADMIN_ENGINE, 409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)}),
    ("delete", "/products/{product_id}/engines/{user_id}"): (AdminActionOut, {
        **_ADMIN_ENGINE, 409: (BUSY,), 502: (BACKEND,)}),
    ("get", "/metrics/prometheus"): (None, {401: (AK,)}),
    ("get", "/dashboard"): (None, {}),
}
