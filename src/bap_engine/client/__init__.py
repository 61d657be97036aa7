"""Python client for bap-engine: what a product uses instead of hand-rolled HTTP.

A standalone program: it imports nothing of the server (import-linter contract
"standalone-programs"), only httpx.

    from bap_engine.client import BapClient, NotAdmitted, RateLimited

    with BapClient("http://127.0.0.1:8000", platform_key=os.environ["BAP_PLATFORM_KEY"]) as bap:
        adm = bap.admit("user-42")                     # auto_provision and auto_wake on by default
        print(adm.url)                                  # the engine's URL; adm.api_key is its key
        r = bap.call_engine("user-42", "POST", "/execute", json={"message": "hello"})
        r.raise_for_status()                            # a rotated key is picked up by one re-admit
        print(bap.status().by_status)                   # {"running": 1, "sleeping": 0, ...}

`AsyncBapClient` has the same methods, awaitable. Errors: one class per API error code, all
under `BapClientError`; 429 RATE_LIMITED, 409 ENGINE_BUSY and 503s are retried per `RetryPolicy`.
"""

from bap_engine.client._async import AsyncBapClient
from bap_engine.client._calls import DEFAULT_URL, RetryPolicy
from bap_engine.client._errors import (
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
)
from bap_engine.client._models import (
    Admission,
    AuditEvent,
    BootBucket,
    Engine,
    EngineAction,
    EnginePage,
    FleetMetrics,
    FleetStatus,
    Product,
    RegisteredProduct,
)
from bap_engine.client._sync import BapClient

__all__ = [
    "BapClient", "AsyncBapClient", "RetryPolicy", "DEFAULT_URL",
    "Engine", "Admission", "EngineAction", "EnginePage", "FleetStatus", "FleetMetrics", "BootBucket",
    "RegisteredProduct", "Product", "AuditEvent",
    "BapClientError", "ValidationError", "RouteNotFound", "MethodNotAllowed", "PayloadTooLarge",
    "InvalidPlatformKey", "InvalidAdminKey", "PolicyDenied", "ProductNotFound", "EngineNotFound",
    "ProductSlugExists", "EngineAlreadyExists", "EngineNotRunning", "EngineAlreadyRunning", "EngineBusy",
    "QuotaExceeded", "RateLimited", "InternalError", "BackendError", "PortExhaustion", "ServiceUnavailable",
    "BootTimeout", "NotAdmitted", "MissingKey", "ConnectionFailed",
]
