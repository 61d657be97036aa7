"""Request logging: one JSON line per HTTP request, and an `X-Request-ID` on every answer.

The line carries method, path, status, duration_ms and request_id, and nothing else: no header
value, no query string, no body, so no key can reach the log through it. The request id is always
generated here (an incoming X-Request-ID is not echoed: it is a header value like any other).
"""

from __future__ import annotations

import logging
import os
import time

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["RequestLog", "REQUEST_ID_HEADER"]

log = logging.getLogger("bap_engine.access")
REQUEST_ID_HEADER = "X-Request-ID"
_QUIET = frozenset({"/health", "/metrics/prometheus"})  # polled endpoints log at DEBUG


class RequestLog:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it must not buffer streamed bodies)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = os.urandom(8).hex()
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            path = str(scope.get("path", ""))
            level = logging.DEBUG if path in _QUIET and status < 400 else logging.INFO
            if log.isEnabledFor(level):
                log.log(level, "request", extra={
                    "method": scope.get("method"), "path": path, "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2), "request_id": request_id,
                })
