"""Response models for the OpenAPI document, and which error codes each endpoint can answer.

The routes build their JSON by hand (orjson, no response validation on the hot path); these models
describe those shapes for `/openapi.json`, and `ENDPOINTS` lists each endpoint's error codes by
HTTP status, as in spec/API.md. `api/openapi.py` applies both to the generated document.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from bap_engine.api.models import AdmitOut, EngineListItem, EngineOut

__all__ = [
    "ProvisionOut", "DestroyOut", "StartOut", "StopOut", "EngineListOut", "StatusOut", "MetricsOut",
    "RegisterOut", "PolicyOut", "HealthOut", "ProductOut", "ProductsOut", "BootBucketOut", "BootOut",
    "ProductMetricsOut", "AuditEventOut", "AuditOut", "AdminActionOut", "ENDPOINTS", "COMMON_ERRORS", "Errors",
    "AuditPageEventOut", "AuditAnyEventOut", "AuditAnyOut", "UsageFiguresOut", "UsageUserOut",
    "UsageOut",
    "WebhookSecretOut", "WebhookOut", "WebhookDeletedOut", "ProductDetailOut", "ProductDeletedOut",
    "PlatformKeyOut", "UpgradeOut",
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


class UpgradeOut(BaseModel):
    engine_id: str
    user_id: str
    status: str
    url: str | None
    engine_version: str = Field(description="the version the engine runs now")
    outcome: str = Field(description='"upgraded", or "rolled_back" (the new version did not become healthy)')


class EngineListOut(BaseModel):
    engines: list[EngineListItem]
    total: int


class StatusOut(BaseModel):
    total: int
    by_status: dict[str, int]
    health: str
    unhealthy_count: int
    warm: int = Field(description="warm-pool engines ready to be claimed (not counted in total or by_status)")


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


class ProductDetailOut(BaseModel):
    """The product and how many engines it has."""

    product_id: str
    slug: str
    display_name: str
    policy: dict[str, object]
    created_at: str | None
    engines: int = Field(description="the product's engines, its warm pool included")


class ProductDeletedOut(BaseModel):
    """The product is gone, with every engine it had."""

    status: str = Field(description='"deleted"')
    product_id: str
    engines_destroyed: int = Field(description="engines this call destroyed (warm pool included)")


class PlatformKeyOut(BaseModel):
    """The product's new platform key, shown once."""

    product_id: str
    platform_api_key: str


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


class AuditPageEventOut(BaseModel):
    id: int
    timestamp: str | None
    action: str
    user_id: str | None
    engine_id: str | None
    actor: str
    metadata: dict[str, object]
    duration_ms: int | None


class AuditAnyEventOut(AuditPageEventOut):
    product_id: str | None = Field(default=None, description="X-Admin-Key only")


class AuditAnyOut(BaseModel):
    """Audit events, newest first: a product's page (X-Platform-Key) or the operator's form (X-Admin-Key)."""

    events: list[AuditAnyEventOut]
    next_cursor: str | None = Field(default=None, description=(
        "X-Platform-Key only (always present there): pass it as `cursor` for the next page; null on the last"))


class UsageFiguresOut(BaseModel):
    """Whole seconds in each state inside the window (each user's exact sum floored) and counts."""

    running_s: int
    sleeping_s: int
    stopped_s: int
    provisions: int
    wakes: int
    restarts: int


class UsageUserOut(UsageFiguresOut):
    user_id: str


class UsageOut(BaseModel):
    """Usage in [since, until): every user with a non-zero figure, by user_id; totals sum the users."""

    since: str
    until: str
    users: list[UsageUserOut]
    totals: UsageFiguresOut


class WebhookSecretOut(BaseModel):
    """The product's webhook and its signing secret, shown once (a new PUT makes a new one)."""

    url: str
    secret: str = Field(description="whsec_...: the HMAC-SHA256 key of X-Bap-Signature")


class WebhookOut(BaseModel):
    """The product's webhook and its delivery state (never the secret)."""

    url: str
    pending: int = Field(description="events not yet acknowledged (at least: counted up to 10000)")
    last_status: int | None = Field(description="HTTP status of the last attempt (null: none, or no answer)")
    last_delivery_at: str | None = Field(description="when the last attempt was made")


class WebhookDeletedOut(BaseModel):
    status: str


class AdminActionOut(BaseModel):
    """An admin action's result; never carries a key (the product gets a rotated key from admit/get)."""

    engine_id: str
    user_id: str
    status: str
    url: str | None


V, PK, AK = "VALIDATION_ERROR", "INVALID_PLATFORM_KEY", "INVALID_ADMIN_KEY"
BUSY, BACKEND, BOOT = "ENGINE_BUSY", "BACKEND_ERROR", "BOOT_TIMEOUT"
PORTS, DB, TOO_LARGE = "PORT_EXHAUSTION", "SERVICE_UNAVAILABLE", "PAYLOAD_TOO_LARGE"
WH = "WEBHOOK_NOT_FOUND"
Errors = dict[int, tuple[str, ...]]

# Every endpoint may also answer 500 INTERNAL_ERROR.
COMMON_ERRORS: Errors = {500: ("INTERNAL_ERROR",)}


def _errors(*parts: Errors) -> Errors:
    """The union of error tables, codes merged per status."""
    out: dict[int, tuple[str, ...]] = {}
    for part in parts:
        for status, codes in part.items():
            out[status] = tuple(dict.fromkeys((*out.get(status, ()), *codes)))
    return out


# what every route behind a key can answer: a bad key, and the database down (503 through app._db_down)
_PLATFORM: Errors = {401: (PK,), 503: (DB,)}
_ADMIN: Errors = {401: (AK,), 503: (DB,)}
_BODY: Errors = {400: (V,), 413: (TOO_LARGE,)}
_ENGINE: Errors = _errors(_PLATFORM, {400: (V,), 404: ("ENGINE_NOT_FOUND",)})  # a user_id in the path
_ADMIN_ENGINE: Errors = _errors(_ADMIN, {400: (V,), 404: ("PRODUCT_NOT_FOUND", "ENGINE_NOT_FOUND")})
_BOOTS: Errors = {502: (BACKEND,), 503: (PORTS,), 504: (BOOT,)}  # an engine is created or started

# (method, path) → (200 model or None for a non-JSON answer, errors by status)
ENDPOINTS: dict[tuple[str, str], tuple[type[BaseModel] | None, Errors]] = {
    ("get", "/health"): (HealthOut, {503: (DB,)}),
    ("post", "/engines/provision"): (ProvisionOut, _errors(_PLATFORM, _BODY, _BOOTS, {
        409: ("ENGINE_ALREADY_EXISTS", BUSY), 429: ("QUOTA_EXCEEDED",)})),
    ("delete", "/engines/{user_id}"): (DestroyOut, _errors(_ENGINE, {409: (BUSY,), 502: (BACKEND,)})),
    ("post", "/engines/{user_id}/start"): (StartOut, _errors(_ENGINE, _BOOTS, {409: ("ENGINE_ALREADY_RUNNING", BUSY)})),
    ("post", "/engines/{user_id}/stop"): (StopOut, _errors(_ENGINE, {409: ("ENGINE_NOT_RUNNING", BUSY),
                                                                      502: (BACKEND,)})),
    ("post", "/engines/{user_id}/upgrade"): (UpgradeOut, _errors(_ENGINE, _BODY, {
        409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,), 504: (BOOT,)})),
    ("post", "/engines/{user_id}/rotate-key"): (ProvisionOut, _errors(_ENGINE, {409: ("ENGINE_NOT_RUNNING", BUSY),
                                                                                502: (BACKEND,)})),
    ("get", "/engines/{user_id}"): (EngineOut, _ENGINE),
    ("patch", "/engines/{user_id}"): (EngineOut, _errors(_ENGINE, _BODY)),  # no state change: never 409
    ("post", "/engines/{user_id}/admit"): (AdmitOut, _errors(_PLATFORM, _BODY, _BOOTS, {
        409: (BUSY,), 429: ("RATE_LIMITED", "QUOTA_EXCEEDED")})),
    ("get", "/engines"): (EngineListOut, _errors(_PLATFORM, {400: (V,)})),
    ("get", "/status"): (StatusOut, _PLATFORM),
    ("get", "/metrics"): (MetricsOut, _PLATFORM),
    ("get", "/events"): (None, _errors(_PLATFORM, {400: (V,)})),  # text/event-stream
    ("post", "/products/register"): (RegisterOut, _errors(_ADMIN, _BODY, {409: ("PRODUCT_SLUG_EXISTS",)})),
    ("put", "/products/{product_id}/policy"): (PolicyOut, _errors(_ADMIN, _BODY, {404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/products"): (ProductsOut, _ADMIN),
    ("get", "/products/{product_id}"): (ProductDetailOut, _errors(_ADMIN, {404: ("PRODUCT_NOT_FOUND",)})),
    # 503 SERVICE_UNAVAILABLE also when engines are left: the product stays deleted, the reconciler finishes
    ("delete", "/products/{product_id}"): (ProductDeletedOut, _errors(_ADMIN, {404: ("PRODUCT_NOT_FOUND",)})),
    ("post", "/products/{product_id}/rotate-platform-key"): (PlatformKeyOut, _errors(_ADMIN, _BODY, {
        404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/products/{product_id}/engines"): (EngineListOut, _errors(_ADMIN, {400: (V,),
                                                                                 404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/products/{product_id}/engines/{user_id}"): (EngineListItem, _ADMIN_ENGINE),
    ("put", "/products/{product_id}/webhook"): (WebhookSecretOut, _errors(_ADMIN, _BODY, {
        404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/products/{product_id}/webhook"): (WebhookOut, _errors(_ADMIN, {404: ("PRODUCT_NOT_FOUND", WH)})),
    ("delete", "/products/{product_id}/webhook"): (WebhookDeletedOut, _errors(_ADMIN, {
        404: ("PRODUCT_NOT_FOUND", WH)})),
    ("get", "/products/{product_id}/metrics"): (ProductMetricsOut, _errors(_ADMIN, {404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/products/{product_id}/audit"): (AuditOut, _errors(_ADMIN, {400: (V,), 404: ("PRODUCT_NOT_FOUND",)})),
    # X-Admin-Key or X-Platform-Key (admin wins); no key is INVALID_ADMIN_KEY
    ("get", "/audit"): (AuditAnyOut, _errors(_ADMIN, _PLATFORM, {400: (V,), 404: ("PRODUCT_NOT_FOUND",)})),
    ("get", "/usage"): (UsageOut, _errors(_PLATFORM, {400: (V,)})),
    ("post", "/products/{product_id}/engines/{user_id}/stop"): (AdminActionOut, _errors(_ADMIN_ENGINE, {
        409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)})),
    ("post", "/products/{product_id}/engines/{user_id}/start"): (AdminActionOut, _errors(_ADMIN_ENGINE, _BOOTS, {
        409: ("ENGINE_ALREADY_RUNNING", BUSY)})),
    ("post", "/products/{product_id}/engines/{user_id}/rotate-key"): (AdminActionOut, _errors(_ADMIN_ENGINE, {
        409: ("ENGINE_NOT_RUNNING", BUSY), 502: (BACKEND,)})),
    ("delete", "/products/{product_id}/engines/{user_id}"): (AdminActionOut, _errors(_ADMIN_ENGINE, {
        409: (BUSY,), 502: (BACKEND,)})),
    # 503 also when the app runs without its metrics registry
    ("get", "/metrics/prometheus"): (None, _ADMIN),
    ("get", "/dashboard"): (None, {}),
}
