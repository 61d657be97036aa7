"""The admit fast path: `POST /engines/{user_id}/admit` answered without routing and
dependency solving.

Admit is called before every user request of every product, and FastAPI's per-request
machinery cost more CPU than the admit itself. This middleware runs the very same code as
the documented route (`routes.engines.admit_response`) and maps errors through the same
envelope; every other request passes through untouched.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from bap_engine.api.deps import Services, check_user_id
from bap_engine.api.errors import bap_error_response, envelope
from bap_engine.api.routes.engines import admit_response
from bap_engine.errors import BapError

__all__ = ["AdmitFastPath"]

log = logging.getLogger("bap_engine.api")
_PREFIX, _SUFFIX = "/engines/", "/admit"


class AdmitFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        user_id = _admit_user(scope)
        services: Services | None = getattr(scope["app"].state, "services", None) if user_id else None
        if user_id is None or services is None:
            await self.app(scope, receive, send)
            return
        response: Response
        try:
            body = await _read_body(receive)
            key = _header(scope, b"x-platform-key")
            response = await admit_response(services.discovery, key, check_user_id(user_id), body)
        except BapError as err:
            response = bap_error_response(err)
        except Exception as err:  # the app's own handlers (database outage → 503, else 500)
            response = await _handled(scope, err)
        await response(scope, receive, send)


async def _handled(scope: Scope, err: Exception) -> Response:
    handlers = scope["app"].exception_handlers
    for cls in type(err).__mro__:
        handler = handlers.get(cls)
        if handler is not None:
            result = await handler(Request(scope), err)
            if isinstance(result, Response):
                return result
    log.error("unhandled error on POST %s: %s", scope["path"], type(err).__name__)
    return envelope(500, "INTERNAL_ERROR", "internal error")


def _admit_user(scope: Scope) -> str | None:
    if scope["type"] != "http" or scope["method"] != "POST":
        return None
    path: str = scope["path"]
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    user_id = path[len(_PREFIX):-len(_SUFFIX)]
    return user_id if user_id and "/" not in user_id else None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
