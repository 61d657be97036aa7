"""The error envelope: every non-2xx answer is {"error": {"code", "message"}}.

The only place HTTP statuses are chosen. One handler covers every BapError (found
through the class's MRO); others map validation, unknown routes and the catch-all 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bap_engine import errors as e
from bap_engine.api.methods import allowed_methods
from bap_engine.api.responses import JSON

__all__ = ["STATUS", "envelope", "bap_error_response", "install_error_handlers"]

log = logging.getLogger("bap_engine.api")

STATUS: dict[type[e.BapError], int] = {
    e.ValidationFailed: 400,
    e.InvalidPlatformKey: 401,
    e.InvalidAdminKey: 401,
    e.PolicyDenied: 403,
    e.ProductNotFound: 404,
    e.EngineNotFound: 404,
    e.WebhookNotFound: 404,
    e.ProductSlugExists: 409,
    e.EngineAlreadyExists: 409,
    e.EngineNotRunning: 409,
    e.EngineAlreadyRunning: 409,
    e.EngineBusy: 409,
    e.PayloadTooLarge: 413,
    e.QuotaExceeded: 429,
    e.RateLimited: 429,
    e.InternalError: 500,
    e.BackendFailed: 502,
    e.PortExhaustion: 503,
    e.ServiceUnavailable: 503,
    e.BootTimeout: 504,
}


def envelope(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return JSON({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _status_of(err: e.BapError) -> int:
    for cls in type(err).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def bap_error_response(exc: e.BapError) -> Response:
    """The envelope of a domain error, with Retry-After on RATE_LIMITED."""
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, e.RateLimited) else None
    return envelope(_status_of(exc), exc.code, exc.message, headers)


async def _bap_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, e.BapError)
    return bap_error_response(exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    message = f"{where}: {first.get('msg', 'invalid')}" if where else str(first.get("msg", "invalid request"))
    if first.get("type") == "json_invalid":
        message = "request body is not valid JSON"
    return envelope(400, "VALIDATION_ERROR", message)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return envelope(404, "NOT_FOUND", "no such route")
    if exc.status_code == 405:
        allow = allowed_methods(request.app.routes, request.scope)
        return envelope(405, "METHOD_NOT_ALLOWED", "method not allowed on this route", {"Allow": allow})
    if exc.status_code == 413:
        return envelope(413, "PAYLOAD_TOO_LARGE", "request body too large")
    if exc.status_code == 400:
        return envelope(400, "VALIDATION_ERROR", str(exc.detail))
    return envelope(exc.status_code, "INTERNAL_ERROR" if exc.status_code >= 500 else "NOT_FOUND", str(exc.detail))


async def _unexpected(request: Request, exc: Exception) -> Response:
    if isinstance(exc, ClientDisconnect):  # the caller went away: nothing to answer, nothing to report
        return Response(status_code=499)
    log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__)
    return envelope(500, "INTERNAL_ERROR", "internal error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.BapError, _bap_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
