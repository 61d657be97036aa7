"""Client errors: one class per stable error code of the API, plus the client's own.

    BapClientError                  any non-2xx answer, or no answer at all
    ├── ValidationError             VALIDATION_ERROR
    ├── RouteNotFound               NOT_FOUND
    ├── MethodNotAllowed            METHOD_NOT_ALLOWED
    ├── PayloadTooLarge             PAYLOAD_TOO_LARGE
    ├── InvalidPlatformKey          INVALID_PLATFORM_KEY
    ├── InvalidAdminKey             INVALID_ADMIN_KEY
    ├── PolicyDenied                POLICY_DENIED
    ├── ProductNotFound             PRODUCT_NOT_FOUND
    ├── EngineNotFound              ENGINE_NOT_FOUND
    ├── WebhookNotFound             WEBHOOK_NOT_FOUND
    ├── ProductSlugExists           PRODUCT_SLUG_EXISTS
    ├── EngineAlreadyExists         ENGINE_ALREADY_EXISTS
    ├── EngineNotRunning            ENGINE_NOT_RUNNING
    ├── EngineAlreadyRunning        ENGINE_ALREADY_RUNNING
    ├── EngineBusy                  ENGINE_BUSY (retried)
    ├── QuotaExceeded               QUOTA_EXCEEDED
    ├── RateLimited                 RATE_LIMITED (retried; carries retry_after)
    ├── InternalError               INTERNAL_ERROR
    ├── BackendError                BACKEND_ERROR
    ├── PortExhaustion              PORT_EXHAUSTION (retried)
    ├── ServiceUnavailable          SERVICE_UNAVAILABLE (retried)
    ├── BootTimeout                 BOOT_TIMEOUT
    ├── NotAdmitted                 admit answered admitted=false (carries reason)
    ├── MissingKey                  the client was built without the key this call needs
    └── ConnectionFailed            the server could not be reached

Messages come from the server (which never puts a key in them) or from the client itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

import httpx

__all__ = [
    "BapClientError", "ValidationError", "RouteNotFound", "MethodNotAllowed", "PayloadTooLarge",
    "InvalidPlatformKey", "InvalidAdminKey", "PolicyDenied", "ProductNotFound", "EngineNotFound", "WebhookNotFound",
    "ProductSlugExists", "EngineAlreadyExists", "EngineNotRunning", "EngineAlreadyRunning", "EngineBusy",
    "QuotaExceeded", "RateLimited", "InternalError", "BackendError", "PortExhaustion", "ServiceUnavailable",
    "BootTimeout", "NotAdmitted", "MissingKey", "ConnectionFailed", "ERRORS_BY_CODE", "error_from_response",
]


class BapClientError(Exception):
    """Base of every client error: `code` is the API's stable code, `status` the HTTP status (0: none)."""

    code = "CLIENT_ERROR"

    def __init__(self, message: str, *, code: str | None = None, status: int = 0,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.retry_after = retry_after  # seconds, from the Retry-After header when the server sent one
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ValidationError(BapClientError):
    """The request was malformed (400)."""

    code = "VALIDATION_ERROR"


class RouteNotFound(BapClientError):
    """No such route on the server (404): usually a wrong base URL."""

    code = "NOT_FOUND"


class MethodNotAllowed(BapClientError):
    """Wrong method for the route (405)."""

    code = "METHOD_NOT_ALLOWED"


class PayloadTooLarge(BapClientError):
    """The request body is too large (413)."""

    code = "PAYLOAD_TOO_LARGE"


class InvalidPlatformKey(BapClientError):
    """The platform key is missing or unknown (401)."""

    code = "INVALID_PLATFORM_KEY"


class InvalidAdminKey(BapClientError):
    """The admin key is missing or wrong (401)."""

    code = "INVALID_ADMIN_KEY"


class PolicyDenied(BapClientError):
    """The product's policy forbids the operation (403)."""

    code = "POLICY_DENIED"


class ProductNotFound(BapClientError):
    """No product with that id (404)."""

    code = "PRODUCT_NOT_FOUND"


class EngineNotFound(BapClientError):
    """The product has no engine for that user (404)."""

    code = "ENGINE_NOT_FOUND"


class WebhookNotFound(BapClientError):
    """The product has no webhook (404)."""

    code = "WEBHOOK_NOT_FOUND"


class ProductSlugExists(BapClientError):
    """The slug is taken (409)."""

    code = "PRODUCT_SLUG_EXISTS"


class EngineAlreadyExists(BapClientError):
    """Provision for a user who already has an engine (409)."""

    code = "ENGINE_ALREADY_EXISTS"


class EngineNotRunning(BapClientError):
    """The operation needs a running engine (409)."""

    code = "ENGINE_NOT_RUNNING"


class EngineAlreadyRunning(BapClientError):
    """Start of a running engine (409)."""

    code = "ENGINE_ALREADY_RUNNING"


class EngineBusy(BapClientError):
    """Another transition is in progress on the engine (409); retried with backoff."""

    code = "ENGINE_BUSY"


class QuotaExceeded(BapClientError):
    """The product reached its max_engines (429); not retried."""

    code = "QUOTA_EXCEEDED"


class RateLimited(BapClientError):
    """The product's admit rate limit is spent (429); retried after `retry_after` seconds."""

    code = "RATE_LIMITED"


class InternalError(BapClientError):
    """The server failed unexpectedly (500)."""

    code = "INTERNAL_ERROR"


class BackendError(BapClientError):
    """Docker, Kubernetes, the process backend or the engine failed (502)."""

    code = "BACKEND_ERROR"


class PortExhaustion(BapClientError):
    """No free engine port (503); retried."""

    code = "PORT_EXHAUSTION"


class ServiceUnavailable(BapClientError):
    """The server is starting or its database is down (503); retried."""

    code = "SERVICE_UNAVAILABLE"


class BootTimeout(BapClientError):
    """The engine did not become healthy in time (504)."""

    code = "BOOT_TIMEOUT"


class NotAdmitted(BapClientError):
    """admit answered `admitted: false`; `reason` is the contract's reason (engine_sleeping, ...)."""

    code = "NOT_ADMITTED"

    def __init__(self, reason: str) -> None:
        super().__init__(f"engine not admitted: {reason}", status=200)
        self.reason = reason


class MissingKey(BapClientError):
    """The call needs a platform or admin key the client was not given."""

    code = "MISSING_KEY"


class ConnectionFailed(BapClientError):
    """The server could not be reached (after the configured retries)."""

    code = "CONNECTION_ERROR"


# The API's error codes and the class raised for each (read-only; tests compare it with the server's codes).
ERRORS_BY_CODE: Mapping[str, type[BapClientError]] = MappingProxyType({
    cls.code: cls for cls in (
        ValidationError, RouteNotFound, MethodNotAllowed, PayloadTooLarge, InvalidPlatformKey, InvalidAdminKey,
        PolicyDenied, ProductNotFound, EngineNotFound, WebhookNotFound, ProductSlugExists, EngineAlreadyExists,
        EngineNotRunning, EngineAlreadyRunning, EngineBusy, QuotaExceeded, RateLimited, InternalError, BackendError,
        PortExhaustion, ServiceUnavailable, BootTimeout,
    )
})


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after", "")
    try:
        return max(0.0, float(raw))
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> BapClientError:
    """The typed error for a non-2xx answer (the base class for an unknown code or a non-envelope body)."""
    code, message = f"HTTP_{response.status_code}", response.reason_phrase or "error"
    try:
        doc = response.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        code = str(doc["error"].get("code", code))
        message = str(doc["error"].get("message", message))
    cls = ERRORS_BY_CODE.get(code, BapClientError)
    return cls(message, code=code, status=response.status_code, retry_after=_retry_after(response))
