"""HTTP values passed between the connection loop and the routes: requests and responses.

Owns the shapes only (and the JSON error envelope). It knows nothing of h11 or sockets, so the
routes can be read, and reasoned about, as plain functions from Request to Response.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import NamedTuple

__all__ = ["JsonResponse", "Request", "Response", "StreamResponse", "error", "json_bytes"]


class Request(NamedTuple):
    """A complete request. Header names are lower-case; a repeated header keeps its last value."""

    method: str
    target: str  # the raw path and query string
    path: str
    query: dict[str, str]
    headers: dict[str, bytes]
    body: bytes = b""


class JsonResponse(NamedTuple):
    """A JSON body, sent with Content-Length."""

    status: int
    payload: dict[str, object]
    headers: tuple[tuple[str, str], ...] = ()


class StreamResponse(NamedTuple):
    """A body produced piece by piece, sent with chunked transfer encoding."""

    status: int
    content_type: str
    chunks: AsyncGenerator[bytes, None]
    headers: tuple[tuple[str, str], ...] = ()


Response = JsonResponse | StreamResponse


def json_bytes(payload: object) -> bytes:
    """Compact JSON, ASCII-only so it is safe on one SSE ``data:`` line."""
    return json.dumps(payload, separators=(",", ":")).encode()


def error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> JsonResponse:
    """The error envelope ``{"error": CODE, "message": ...}``."""
    return JsonResponse(status, {"error": code, "message": message}, headers)
