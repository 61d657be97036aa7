"""Python client for bap-engine, re-exported: the code lives in the `bap-engine-client` distribution.

`bap_engine.client` is kept so that existing code keeps working; new code imports `bap_engine_client`
(the same objects). The server depends on that distribution (`pip install -e ./clients/python`, done
by `make install`). A standalone program: nothing of the server is imported here. Every public name
of `bap_engine_client` but `__version__` is re-exported (tests/packaging checks both lists agree).

    from bap_engine.client import BapClient, NotAdmitted, RateLimited   # == from bap_engine_client import ...
"""

from bap_engine_client import (
    DEFAULT_URL,
    ERRORS_BY_CODE,
    Admission,
    AsyncBapClient,
    AuditEvent,
    AuditPage,
    BackendError,
    BapClient,
    BapClientError,
    BootBucket,
    BootTimeout,
    ConnectionFailed,
    Engine,
    EngineAction,
    EngineAlreadyExists,
    EngineAlreadyRunning,
    EngineBusy,
    EngineNotFound,
    EngineNotRunning,
    EnginePage,
    Event,
    FleetMetrics,
    FleetStatus,
    InternalError,
    InvalidAdminKey,
    InvalidPlatformKey,
    MethodNotAllowed,
    MissingKey,
    NotAdmitted,
    PayloadTooLarge,
    PlatformKey,
    PolicyDenied,
    PortExhaustion,
    Product,
    ProductDeletion,
    ProductNotFound,
    ProductSlugExists,
    QuotaExceeded,
    RateLimited,
    RegisteredProduct,
    RetryPolicy,
    RouteNotFound,
    ServiceUnavailable,
    Usage,
    UsageTotals,
    UserUsage,
    ValidationError,
    Webhook,
    WebhookNotFound,
    WebhookSecret,
    verify_signature,
)

__all__ = [
    "BapClient", "AsyncBapClient", "RetryPolicy", "DEFAULT_URL", "ERRORS_BY_CODE",
    "Engine", "Admission", "EngineAction", "EnginePage", "FleetStatus", "FleetMetrics", "BootBucket",
    "RegisteredProduct", "Product", "AuditEvent",
    "BapClientError", "ValidationError", "RouteNotFound", "MethodNotAllowed", "PayloadTooLarge",
    "InvalidPlatformKey", "InvalidAdminKey", "PolicyDenied", "ProductNotFound", "EngineNotFound",
    "ProductSlugExists", "EngineAlreadyExists", "EngineNotRunning", "EngineAlreadyRunning", "EngineBusy",
    "QuotaExceeded", "RateLimited", "InternalError", "BackendError", "PortExhaustion", "ServiceUnavailable",
    "BootTimeout", "NotAdmitted", "MissingKey", "ConnectionFailed", "WebhookNotFound", "verify_signature",
    "AuditPage", "Event", "Usage", "UserUsage", "UsageTotals", "Webhook", "WebhookSecret",
    "ProductDeletion", "PlatformKey",
]
