"""One HTTP/1.1 connection: h11 over asyncio streams, with keep-alive.

Owns the byte-level conversation with one client: read a full request (body capped at
``MAX_BODY_BYTES``), hand it to the routes, write the response (JSON with Content-Length, streams
chunked), then start the next cycle. It never parses HTTP itself (h11 does) and knows no route.
``busy`` is true from the first request event until the response is fully written, so a
shutdown can drop idle connections at once and let busy ones finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h11

from .wire import JsonResponse, Request, Response, StreamResponse, error, json_bytes

__all__ = ["MAX_BODY_BYTES", "Connection", "RequestHandler"]

MAX_BODY_BYTES = 1 << 20
READ_SIZE = 64 * 1024
READ_TIMEOUT_S = 60.0  # also the keep-alive idle timeout
LINGER_S = 2.0
_SERVER_HEADER = ("server", "bap-refengine")
_log = logging.getLogger("bap_refengine.http")

RequestHandler = Callable[[Request], Awaitable[Response]]


class _PayloadTooLarge(Exception):
    """The request body exceeds MAX_BODY_BYTES."""


# The statuses this engine sends (http.HTTPStatus would cost start time for 60 unused members).
_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    413: b"Content Too Large",
    500: b"Internal Server Error",
}


def _reason(status: int) -> bytes:
    return _REASONS.get(status, b"")


def _query(raw: str) -> dict[str, str]:
    if not raw:
        return {}
    # Imported on first use: urllib.parse (with ipaddress) is ~5 % of start time and /health has no query.
    from urllib.parse import parse_qsl

    return dict(parse_qsl(raw, keep_blank_values=True))


def _to_request(event: h11.Request, body: bytes) -> Request:
    target = event.target.decode("latin-1")
    path, _, raw_query = target.partition("?")
    if "://" in path:  # absolute-form target (RFC 9112 3.2.2): keep only the path
        path = "/" + path.split("://", 1)[1].partition("/")[2]
    return Request(
        method=event.method.decode("ascii"),
        target=target,
        path=path,
        query=_query(raw_query),
        headers={name.decode("latin-1"): value for name, value in event.headers},
        body=body,
    )


class Connection:
    """Serves requests on one accepted socket until the client or the server closes it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        handler: RequestHandler,
        closing: Callable[[], bool],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._handler = handler
        self._closing = closing
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self.busy = False

    async def serve(self) -> None:
        """Loop over requests; returns when the connection is closed."""
        try:
            while await self._serve_one():
                self._h11.start_next_cycle()
        except (ConnectionError, TimeoutError):
            pass  # the client went away or idled out: nothing to answer
        finally:
            self.busy = False
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()

    async def _serve_one(self) -> bool:
        """Serve one request; True when the connection may carry another."""
        try:
            request = await self._read_request()
        except h11.RemoteProtocolError:
            await self._send_json_if_possible(error(400, "VALIDATION_ERROR", "malformed HTTP request"))
            await self._discard_rest()
            return False
        except _PayloadTooLarge:
            limit = f"request body exceeds {MAX_BODY_BYTES} bytes"
            await self._send_json_if_possible(error(413, "PAYLOAD_TOO_LARGE", limit))
            await self._discard_rest()
            return False
        if request is None:
            return False
        try:
            response = await self._handler(request)
        except Exception:
            _log.exception("unhandled error on %s %s", request.method, request.path)
            response = error(500, "INTERNAL_ERROR", "internal error")
        if isinstance(response, JsonResponse):
            await self._send_json(response)
        else:
            await self._send_stream(response)
        self.busy = False
        return self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE and not self._closing()

    async def _next_event(self) -> object:
        """The next h11 event (PAUSED never occurs: a cycle ends at EndOfMessage)."""
        while True:
            event = self._h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            if self._h11.they_are_waiting_for_100_continue:
                await self._write(h11.InformationalResponse(status_code=100, headers=[], reason=_reason(100)))
            async with asyncio.timeout(READ_TIMEOUT_S):
                data = await self._reader.read(READ_SIZE)
            self._h11.receive_data(data)

    async def _read_request(self) -> Request | None:
        """The next full request, or None when the client closed the connection between requests."""
        event = await self._next_event()
        if not isinstance(event, h11.Request):
            return None  # ConnectionClosed
        self.busy = True
        declared = dict(event.headers).get(b"content-length")
        if declared is not None and int(declared) > MAX_BODY_BYTES:
            raise _PayloadTooLarge
        body = bytearray()
        while True:
            part = await self._next_event()
            if isinstance(part, h11.Data):
                body += part.data
                if len(body) > MAX_BODY_BYTES:
                    raise _PayloadTooLarge
            elif isinstance(part, h11.EndOfMessage):
                return _to_request(event, bytes(body))
            else:  # h11 raises RemoteProtocolError itself on a truncated body
                raise h11.RemoteProtocolError("unexpected event in request body", 400)

    def _headers(self, extra: tuple[tuple[str, str], ...]) -> list[tuple[str, str]]:
        headers = [*extra, _SERVER_HEADER]
        if self._closing():
            headers.append(("connection", "close"))
        return headers

    async def _write(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            self._writer.write(data)
            await self._writer.drain()

    async def _send_json(self, response: JsonResponse) -> None:
        body = json_bytes(response.payload)
        fixed = (("content-type", "application/json"), ("content-length", str(len(body))))
        headers = self._headers(fixed + response.headers)
        reason = _reason(response.status)
        await self._write(h11.Response(status_code=response.status, headers=headers, reason=reason))
        await self._write(h11.Data(data=body))
        await self._write(h11.EndOfMessage())

    async def _send_json_if_possible(self, response: JsonResponse) -> None:
        """Answer an unreadable request, unless the response has already started."""
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        # Ask for close: the rest of the client's request can no longer be trusted or read.
        closing = (*response.headers, ("connection", "close"))
        with contextlib.suppress(h11.LocalProtocolError):
            await self._send_json(JsonResponse(response.status, response.payload, closing))

    async def _discard_rest(self) -> None:
        """Lingering close: drop what the client is still sending, for at most LINGER_S.

        Closing a socket with unread input makes the kernel send RST, and the client would lose the
        error response it has not read yet.
        """
        with contextlib.suppress(OSError, TimeoutError):
            if self._writer.can_write_eof():
                self._writer.write_eof()
            async with asyncio.timeout(LINGER_S):
                while await self._reader.read(READ_SIZE):
                    pass

    async def _send_stream(self, response: StreamResponse) -> None:
        # No Content-Length: h11 picks chunked encoding for HTTP/1.1 (close-delimited for 1.0).
        head = (("content-type", response.content_type), *response.headers)
        headers, reason = self._headers(head), _reason(response.status)
        await self._write(h11.Response(status_code=response.status, headers=headers, reason=reason))
        try:
            async for chunk in response.chunks:
                await self._write(h11.Data(data=chunk))
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            # Headers are out, so no error status can be sent: cut the stream so the client sees it.
            _log.exception("stream failed mid-response")
            raise ConnectionAbortedError from None
        finally:
            await response.chunks.aclose()
        await self._write(h11.EndOfMessage())
