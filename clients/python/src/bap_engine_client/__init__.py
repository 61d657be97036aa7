"""Python client for bap-engine: what a product uses instead of hand-rolled HTTP.

The `bap-engine-client` distribution: it depends on httpx only and imports nothing of the server
(import-linter contract "client-distribution-standalone"; tests/packaging installs it alone in a
clean venv). The server re-exports it as `bap_engine.client`.

    from bap_engine_client import BapClient, NotAdmitted, RateLimited

    with BapClient("http://127.0.0.1:8000", platform_key=os.environ["BAP_PLATFORM_KEY"]) as bap:
        adm = bap.admit("user-42")                     # auto_provision and auto_wake on by default
        print(adm.url)                                  # the engine's URL; adm.api_key is its key
        r = bap.call_engine("user-42", "POST", "/execute", json={"message": "hello"})
        r.raise_for_status()                            # a rotated key is picked up by one re-admit
        print(bap.status().by_status)                   # {"running": 1, "sleeping": 0, ...}
        for event in bap.events():                      # lifecycle events, live; reconnects by itself
            print(event.id, event.action, event.user_id)

`AsyncBapClient` has the same methods, awaitable (`BapClient` is generated from it by
scripts/gen_sync.py). Errors: one class per API error code, all under `BapClientError`
(`ERRORS_BY_CODE` maps each code to its class); 429 RATE_LIMITED, 409 ENGINE_BUSY and 503s are
retried per `RetryPolicy`. `verify_signature(secret, timestamp, signature, body)` checks a webhook
request bap-engine sent (see `bap_engine_client.webhooks`).
"""

__version__ = "0.1.0"

from bap_engine_client._async import AsyncBapClient
from bap_engine_client._calls import DEFAULT_URL, RetryPolicy
from bap_engine_client._errors import (
    ERRORS_BY_CODE,
    BackendError,
    BapClientError,
    BootTimeout,
    ConnectionFailed,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineBusy,
    EngineNotFound,
    EngineNotRunning,
    InternalError,
    InvalidAdminKey,
    InvalidPlatformKey,
    MethodNotAllowed,
    MissingKey,
    NotAdmitted,
    PayloadTooLarge,
    PolicyDenied,
    PortExhaustion,
    ProductNotFound,
    ProductSlugExists,
    QuotaExceeded,
    RateLimited,
    RouteNotFound,
    ServiceUnavailable,
    ValidationError,
    WebhookNotFound,
)
from bap_engine_client._models import (
    Admission,
    AuditEvent,
    AuditPage,
    BootBucket,
    Engine,
    EngineAction,
    EnginePage,
    Event,
    FleetMetrics,
    FleetStatus,
    PlatformKey,
    Product,
    ProductDeletion,
    RegisteredProduct,
    Usage,
    UsageTotals,
    UserUsage,
    Webhook,
    WebhookSecret,
)
from bap_engine_client._sync import BapClient
from bap_engine_client.webhooks import verify_signature

__all__ = [
    "__version__", "BapClient", "AsyncBapClient", "RetryPolicy", "DEFAULT_URL", "ERRORS_BY_CODE",
    "Engine", "Admission", "EngineAction", "EnginePage", "FleetStatus", "FleetMetrics", "BootBucket",
    "RegisteredProduct", "Product", "AuditEvent", "AuditPage", "Event", "Usage", "UserUsage", "UsageTotals",
    "Webhook", "WebhookSecret", "ProductDeletion", "PlatformKey",
    "BapClientError", "ValidationError", "RouteNotFound", "MethodNotAllowed", "PayloadTooLarge",
    "InvalidPlatformKey", "InvalidAdminKey", "PolicyDenied", "ProductNotFound", "EngineNotFound",
    "ProductSlugExists", "EngineAlreadyExists", "EngineNotRunning", "EngineAlreadyRunning", "EngineBusy",
    "QuotaExceeded", "RateLimited", "InternalError", "BackendError", "PortExhaustion", "ServiceUnavailable",
    "BootTimeout", "NotAdmitted", "MissingKey", "ConnectionFailed", "WebhookNotFound", "verify_signature",
]
