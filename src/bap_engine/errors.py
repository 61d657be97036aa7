"""Domain errors: one class per stable error code of the API contract.

Bottom layer: imports nothing of the project. HTTP statuses live in `api/errors.py`.

    BapError
    ├── ValidationFailed          VALIDATION_ERROR
    ├── PayloadTooLarge           PAYLOAD_TOO_LARGE
    ├── InvalidPlatformKey        INVALID_PLATFORM_KEY
    ├── InvalidAdminKey           INVALID_ADMIN_KEY
    ├── PolicyDenied              POLICY_DENIED
    ├── ProductNotFound           PRODUCT_NOT_FOUND
    ├── EngineNotFound            ENGINE_NOT_FOUND
    ├── WebhookNotFound           WEBHOOK_NOT_FOUND
    ├── ProductSlugExists         PRODUCT_SLUG_EXISTS
    ├── EngineAlreadyExists       ENGINE_ALREADY_EXISTS
    ├── EngineNotRunning          ENGINE_NOT_RUNNING
    ├── EngineAlreadyRunning      ENGINE_ALREADY_RUNNING
    ├── EngineBusy                ENGINE_BUSY
    ├── QuotaExceeded             QUOTA_EXCEEDED
    ├── RateLimited               RATE_LIMITED (carries retry_after_s)
    ├── BackendFailed             BACKEND_ERROR
    ├── PortExhaustion            PORT_EXHAUSTION
    ├── ServiceUnavailable        SERVICE_UNAVAILABLE
    ├── BootTimeout               BOOT_TIMEOUT
    └── InternalError             INTERNAL_ERROR

Messages are for humans and must never contain a key, a token or an env value.
"""

from __future__ import annotations

__all__ = [
    "BapError",
    "ValidationFailed",
    "PayloadTooLarge",
    "InvalidPlatformKey",
    "InvalidAdminKey",
    "PolicyDenied",
    "ProductNotFound",
    "EngineNotFound",
    "WebhookNotFound",
    "ProductSlugExists",
    "EngineAlreadyExists",
    "EngineNotRunning",
    "EngineAlreadyRunning",
    "EngineBusy",
    "QuotaExceeded",
    "RateLimited",
    "BackendFailed",
    "PortExhaustion",
    "ServiceUnavailable",
    "BootTimeout",
    "InternalError",
]


class BapError(Exception):
    """Base of every domain error; `code` is the stable API error code."""

    code = "INTERNAL_ERROR"
    default_message = "internal error"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or self.default_message
        super().__init__(self.message)


class ValidationFailed(BapError):
    """A request body, query or path parameter is malformed."""

    code = "VALIDATION_ERROR"
    default_message = "invalid request"


class PayloadTooLarge(BapError):
    """The request body exceeds the accepted size."""

    code = "PAYLOAD_TOO_LARGE"
    default_message = "request body too large"


class InvalidPlatformKey(BapError):
    """X-Platform-Key is missing or matches no product."""

    code = "INVALID_PLATFORM_KEY"
    default_message = "missing or invalid X-Platform-Key"


class InvalidAdminKey(BapError):
    """X-Admin-Key (or the admin bearer) is missing or wrong."""

    code = "INVALID_ADMIN_KEY"
    default_message = "missing or invalid admin key"


class PolicyDenied(BapError):
    """The product's policy forbids the operation."""

    code = "POLICY_DENIED"
    default_message = "denied by product policy"


class ProductNotFound(BapError):
    """No product with that id."""

    code = "PRODUCT_NOT_FOUND"
    default_message = "product not found"


class EngineNotFound(BapError):
    """The calling product has no engine for that user."""

    code = "ENGINE_NOT_FOUND"
    default_message = "engine not found"


class WebhookNotFound(BapError):
    """The product has no webhook."""

    code = "WEBHOOK_NOT_FOUND"
    default_message = "webhook not found"


class ProductSlugExists(BapError):
    """A product with that slug is already registered."""

    code = "PRODUCT_SLUG_EXISTS"
    default_message = "product slug already exists"


class EngineAlreadyExists(BapError):
    """Provision for a user who already has an engine."""

    code = "ENGINE_ALREADY_EXISTS"
    default_message = "engine already exists for this user"


class EngineNotRunning(BapError):
    """The operation needs a running engine."""

    code = "ENGINE_NOT_RUNNING"
    default_message = "engine is not running"


class EngineAlreadyRunning(BapError):
    """Start of an engine that is already running."""

    code = "ENGINE_ALREADY_RUNNING"
    default_message = "engine is already running"


class EngineBusy(BapError):
    """Another transition is in progress on this engine; retry."""

    code = "ENGINE_BUSY"
    default_message = "a transition is in progress on this engine; retry"


class QuotaExceeded(BapError):
    """The product already has `max_engines` engines."""

    code = "QUOTA_EXCEEDED"
    default_message = "engine quota exceeded for this product"


class RateLimited(BapError):
    """The product exceeded `rate_limit_rpm` admits in the rolling minute."""

    code = "RATE_LIMITED"
    default_message = "rate limit exceeded"

    def __init__(self, retry_after_s: int, message: str | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, min(60, retry_after_s))


class BackendFailed(BapError):
    """Docker, Kubernetes, the process backend or the engine itself failed. `transient` False
    (a missing image, a bad command) means retrying the same call cannot succeed."""

    code = "BACKEND_ERROR"
    default_message = "engine backend failed"

    def __init__(self, message: str | None = None, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


class PortExhaustion(BapError):
    """Every port in ORCH_PORT_MIN..ORCH_PORT_MAX is taken."""

    code = "PORT_EXHAUSTION"
    default_message = "no free engine port"


class ServiceUnavailable(BapError):
    """The database is unreachable or the service is still starting."""

    code = "SERVICE_UNAVAILABLE"
    default_message = "service unavailable"


class BootTimeout(BapError):
    """The engine did not become healthy within ORCH_BOOT_TIMEOUT_S."""

    code = "BOOT_TIMEOUT"
    default_message = "engine did not become healthy in time"


class InternalError(BapError):
    """An unexpected failure; details go to the log, never to the caller."""

    code = "INTERNAL_ERROR"
    default_message = "internal error"
