"""The engine's HTTP routes: health, execute, history and live key rotation.

``GET /health`` adds ``"busy": true`` while at least one ``/execute`` stream is in flight (the key is
absent otherwise), so the orchestrator does not put a working engine to sleep. A stream counts from its
first event until its generator ends: completed, failed, or closed because the client went away.

Owns authentication (``X-Engine-Key`` against the key ring, on every route except ``GET /health``;
rotation accepts only the current key, never the previous one still inside its overlap window),
routing, body validation and the JSON shapes. Order: health → auth (401) → route (404/405) →
body (400). A request without a valid key learns nothing, not even whether a route exists. It must
never echo or log a key or a key hash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

from .config import EngineConfig, is_key_hash
from .keys import KeyRing
from .sse import CONTENT_TYPE as SSE_CONTENT_TYPE
from .store import MessageStore
from .turn import run_turn
from .wire import JsonResponse, Request, Response, StreamResponse, error

__all__ = ["ENGINE_NAME", "Routes"]

ENGINE_NAME = "bap-refengine"
MAX_THREAD_ID_LENGTH = 256
_log = logging.getLogger("bap_refengine.routes")

Handler = Callable[[Request], Awaitable[Response]]


class _Invalid(Exception):
    """A request body or query that fails validation; becomes 400 VALIDATION_ERROR."""


def _json_object(req: Request) -> dict[str, object]:
    try:
        body = json.loads(req.body)
    except ValueError:  # also UnicodeDecodeError
        raise _Invalid("body must be valid JSON") from None
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object")
    return body


def _thread_id(value: object, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_THREAD_ID_LENGTH:
        raise _Invalid(f"{where} must be a non-empty string of at most {MAX_THREAD_ID_LENGTH} characters")
    return value


class Routes:
    """The request handler given to the server: ``await routes(request) -> Response``."""

    def __init__(self, config: EngineConfig, keys: KeyRing, store: MessageStore) -> None:
        self._config = config
        self._keys = keys
        self._store = store
        self._streams = 0  # /execute streams in flight
        self._table: dict[str, tuple[str, Handler]] = {
            "/execute": ("POST", self.execute),
            "/history": ("GET", self.history),
            "/_bap/rotate-key": ("POST", self.rotate_key),
        }

    async def __call__(self, req: Request) -> Response:
        if req.path == "/health" and req.method == "GET":
            return self.health()
        current_only = req.path == "/_bap/rotate-key"
        if not self._keys.accepts(req.headers.get("x-engine-key"), current_only=current_only):
            return error(401, "INVALID_KEY", "invalid or missing X-Engine-Key")
        if req.path == "/health":
            return error(405, "METHOD_NOT_ALLOWED", "use GET", (("allow", "GET"),))
        route = self._table.get(req.path)
        if route is None:
            return error(404, "NOT_FOUND", f"no route {req.path}")
        method, handler = route
        if req.method != method:
            return error(405, "METHOD_NOT_ALLOWED", f"use {method}", (("allow", method),))
        try:
            return await handler(req)
        except _Invalid as exc:
            return error(400, "VALIDATION_ERROR", str(exc))

    def health(self) -> JsonResponse:
        """``GET /health``: the process is up and its database is open; ``"busy": true`` while it streams."""
        payload: dict[str, object] = {"status": "ok", "engine": ENGINE_NAME, "version": self._config.version}
        if self._streams:
            payload["busy"] = True
        return JsonResponse(200, payload)

    async def _counted(self, chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        """``chunks``, counted as in flight from the first event until they end in any way. The connection
        closes this generator when the client goes away, and a generator never started never counted."""
        self._streams += 1
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            self._streams -= 1
            await chunks.aclose()

    async def execute(self, req: Request) -> Response:
        """``POST /execute`` ``{"message", "thread_id"?}``: stream one turn as server-sent events."""
        body = _json_object(req)
        message = body.get("message")
        if not isinstance(message, str) or not message:
            raise _Invalid("message must be a non-empty string")
        raw_thread = body.get("thread_id")
        thread_id = "default" if raw_thread is None else _thread_id(raw_thread, "thread_id")
        chunks = self._counted(run_turn(self._store, thread_id, message, self._config.delta_delay_seconds))
        headers = (("cache-control", "no-cache"), ("x-accel-buffering", "no"))
        return StreamResponse(200, SSE_CONTENT_TYPE, chunks, headers)

    async def history(self, req: Request) -> Response:
        """``GET /history[?thread_id=]``: stored messages, oldest first."""
        raw = req.query.get("thread_id")
        thread_id = None if raw is None else _thread_id(raw, "thread_id")
        messages = [m.to_json() for m in self._store.history(thread_id)]
        return JsonResponse(200, {"messages": messages})

    async def rotate_key(self, req: Request) -> Response:
        """``POST /_bap/rotate-key`` ``{"key_hash", "overlap_seconds"}``: switch to a new key hash."""
        body = _json_object(req)
        key_hash = body.get("key_hash")
        if not is_key_hash(key_hash):
            raise _Invalid("key_hash must be 64 hex characters (sha256 of the new key)")
        overlap = body.get("overlap_seconds")
        if isinstance(overlap, bool) or not isinstance(overlap, int):
            raise _Invalid("overlap_seconds must be an integer")
        overlap = max(0, min(overlap, self._config.max_overlap_seconds))
        self._keys.rotate(key_hash, overlap)
        _log.info("engine key rotated; previous key accepted for %d s", overlap)
        return JsonResponse(200, {"status": "rotated", "overlap_seconds": overlap})
