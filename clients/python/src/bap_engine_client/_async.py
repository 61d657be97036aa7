"""`AsyncBapClient`: the asyncio client (httpx.AsyncClient).

The source of both clients: `_sync.py` (`BapClient`) is generated from this file by
`scripts/gen_sync.py` (await and async dropped, Async names swapped for their sync twins), and a
test fails when the committed `_sync.py` differs from the generator's output. Edit this file, then
run `python clients/python/scripts/gen_sync.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Mapping
from types import TracebackType
from typing import TypeVar, cast

import httpx

from bap_engine_client import _calls as c
from bap_engine_client._calls import (
    DEFAULT_URL,
    USER_AGENT,
    Call,
    IdleSleep,
    Instant,
    Keys,
    RetryPolicy,
    engine_url,
    key_rejected,
)
from bap_engine_client._errors import BapClientError, ConnectionFailed, error_from_response
from bap_engine_client._models import (
    Admission,
    AuditEvent,
    AuditPage,
    Engine,
    EngineAction,
    EnginePage,
    Event,
    FleetMetrics,
    FleetStatus,
    Json,
    PlatformKey,
    Product,
    ProductDeletion,
    RegisteredProduct,
    Usage,
    Webhook,
    WebhookSecret,
)

__all__ = ["AsyncBapClient"]

T = TypeVar("T")


def _chunks(response: httpx.Response) -> AsyncIterable[bytes]:
    """The body as it arrives (the events request asks for no content-encoding)."""
    return cast("AsyncIterable[bytes]", response.stream)


class AsyncBapClient:
    """Talks to one bap-engine server. `platform_key` for a product's calls, `admin_key` for admin ones.

    Every method raises a `BapClientError` subclass named after the API's error code; transient answers
    (429 RATE_LIMITED, 409 ENGINE_BUSY, 503, connection refused) are retried per `retry`.
    """

    def __init__(
        self, base_url: str = DEFAULT_URL, *, platform_key: str | None = None, admin_key: str | None = None,
        timeout: float = 90.0, engine_timeout: float = 30.0, retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._keys = Keys(platform_key, admin_key)
        self._retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(
            base_url=self.base_url, timeout=timeout, transport=transport, headers={"User-Agent": USER_AGENT}
        )
        self._engines = httpx.AsyncClient(timeout=engine_timeout, headers={"User-Agent": USER_AGENT})

    async def aclose(self) -> None:
        await self._http.aclose()
        await self._engines.aclose()

    async def __aenter__(self) -> AsyncBapClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        headers = self._keys.headers(call.auth)
        attempt = 0
        while True:
            try:
                response = await self._http.request(
                    call.method, call.path, json=call.json, params=call.params, headers=headers
                )
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
                error: BapClientError = ConnectionFailed(f"cannot reach {self.base_url}: {type(err).__name__}")
            except httpx.TransportError as err:
                raise ConnectionFailed(
                    f"{call.method} {call.path}: {type(err).__name__}", code="TRANSPORT_ERROR"
                ) from None
            else:
                if response.is_success:
                    return call.parse(response.json() if response.content else {})
                error = error_from_response(response)
            delay = self._retry.delay(error, attempt) if call.retry else None
            if delay is None:
                raise error
            await asyncio.sleep(delay)
            attempt += 1

    # --- product calls -------------------------------------------------------------------------------
    async def health(self) -> bool:
        """True when the server is up, its database answers and migrations are applied."""
        try:
            return await self._run(c.health())
        except BapClientError:
            return False

    async def admit(self, user_id: str, auto_provision: bool = True, auto_wake: bool = True) -> Admission:
        """Admit the user's next request: `.url` and `.api_key` of the engine, or `.reason` when not admitted."""
        return await self._run(c.admit(user_id, auto_provision, auto_wake))

    async def provision(self, user_id: str, engine_version: str | None = None) -> Engine:
        """Create the user's engine and wait until healthy (EngineAlreadyExists, QuotaExceeded, BootTimeout)."""
        return await self._run(c.provision(user_id, engine_version))

    async def get(self, user_id: str) -> Engine:
        """The user's engine with its key; never provisions (EngineNotFound)."""
        return await self._run(c.get(user_id))

    async def start(self, user_id: str) -> EngineAction:
        return await self._run(c.action(user_id, "start"))

    async def stop(self, user_id: str) -> EngineAction:
        return await self._run(c.action(user_id, "stop"))

    async def destroy(self, user_id: str) -> EngineAction:
        return await self._run(c.destroy(user_id))

    async def rotate_key(self, user_id: str) -> Engine:
        """New engine key (the old one keeps working for the server's overlap window)."""
        return await self._run(c.rotate_key(user_id))

    async def list_engines(self, status: str | None = None, limit: int = 100, offset: int = 0) -> EnginePage:
        return await self._run(c.list_engines(status, limit, offset))

    async def iter_engines(self, status: str | None = None, page_size: int = 500) -> AsyncIterator[Engine]:
        """Every engine of the product, page by page."""
        offset = 0
        while True:
            page = await self.list_engines(status, page_size, offset)
            for engine in page.engines:  # noqa: UP028 (an async generator cannot `yield from`)
                yield engine
            offset += len(page.engines)
            if not page.engines or offset >= page.total:
                return

    async def status(self) -> FleetStatus:
        return await self._run(c.status())

    async def metrics(self) -> FleetMetrics:
        return await self._run(c.metrics())

    async def set_idle_sleep(self, user_id: str, idle_sleep: IdleSleep) -> Engine:
        """"never" keeps the engine awake (the idle worker skips it), "auto" lets it sleep when idle
        again; returns the engine as `get` does (with its key). No state change (EngineNotFound)."""
        return await self._run(c.set_idle_sleep(user_id, idle_sleep))

    async def usage(self, *, since: Instant | None = None, until: Instant | None = None,
                    user_id: str | None = None) -> Usage:
        """Seconds running, sleeping and stopped, provisions, wakes and restarts per user in [since, until)
        (default: the last 24 hours). Times: timezone-aware datetimes or ISO 8601 strings."""
        return await self._run(c.usage(since, until, user_id))

    async def audit_page(
        self, *, user_id: str | None = None, engine_id: str | None = None, action: str | None = None,
        since: Instant | None = None, until: Instant | None = None, limit: int = 100, cursor: str | None = None,
    ) -> AuditPage:
        """One page of the product's audit rows, newest first; pass its `next_cursor` as `cursor` (with the
        same filters) for the next. `iter_audit` follows the cursors for you."""
        return await self._run(c.audit_page(user_id, engine_id, action, since, until, limit, cursor))

    async def iter_audit(
        self, *, user_id: str | None = None, engine_id: str | None = None, action: str | None = None,
        since: Instant | None = None, until: Instant | None = None, page_size: int = 100,
    ) -> AsyncIterator[AuditEvent]:
        """Every audit row of the product matching the filters, newest first, each once, page by page
        (rows written meanwhile are not among them). The admin view of any product is `audit`."""
        cursor: str | None = None
        while True:
            page = await self.audit_page(user_id=user_id, engine_id=engine_id, action=action, since=since,
                                         until=until, limit=page_size, cursor=cursor)
            for event in page.events:  # noqa: UP028 (an async generator cannot `yield from`)
                yield event
            if page.next_cursor is None or not page.events:
                return
            cursor = page.next_cursor

    async def events(
        self, after_id: int | None = None, *, reconnect: bool = True, reconnect_delay: float | None = None,
        idle_timeout: float = 45.0,
    ) -> AsyncGenerator[Event, None]:
        """The product's lifecycle events (GET /events), oldest first, then live, for as long as the caller
        iterates over them (a generator of `Event`; see the README for a loop).

        `after_id`: the events strictly after that id (history first), else the events after this call
        (the newest audit id is read first, so that a reconnect before the first event loses nothing).
        A dropped connection, a stream the server ended, or `idle_timeout` seconds without a byte (the
        server sends a keep-alive every 15 s) is followed by a reconnect with Last-Event-ID set to the
        last event yielded: every event is yielded once, in order. Reconnects wait `reconnect_delay`
        seconds (default: the server's `retry:` hint), doubled after each failed attempt up to the retry
        policy's `backoff_max_s`, and go on without end. Not reconnected: a 4xx (InvalidPlatformKey,
        ValidationError); the first connection fails as any call does (after the retry policy's
        attempts). `reconnect=False`: one connection; it returns when the server ends the stream and
        raises ConnectionFailed (TRANSPORT_ERROR) when the connection drops.

        The connection is closed when the generator is: by `.aclose()` (at once), or once it is garbage
        collected after the caller broke out of its loop.
        """
        headers = {**self._keys.headers("platform"), "Accept": "text/event-stream", "Accept-Encoding": "identity",
                   "Cache-Control": "no-cache"}
        last = after_id
        if last is None and reconnect:
            newest = await self.audit_page(limit=1)
            last = newest.events[0].id if newest.events else 0
        t = self._http.timeout
        timeout = httpx.Timeout(connect=t.connect, read=idle_timeout, write=t.write, pool=t.pool)
        retry_ms: int | None = None
        connected, closing, failures = False, False, 0
        while True:
            error: BapClientError | None = None
            sent = headers if last is None else {**headers, "Last-Event-ID": str(last)}
            try:
                async with self._http.stream("GET", c.EVENTS_PATH, headers=sent, timeout=timeout) as response:
                    if not response.is_success:
                        body = b""
                        async for chunk in _chunks(response):
                            body += chunk
                        error = error_from_response(httpx.Response(response.status_code, headers=response.headers,
                                                                   content=body))
                    else:
                        connected, failures = True, 0
                        parser = c.SseParser()
                        async for chunk in _chunks(response):
                            for message in parser.feed(chunk):
                                event = c.parse_event(message)
                                if last is not None and event.id <= last:
                                    continue  # the server resumes strictly after Last-Event-ID: never expected
                                last = event.id
                                try:
                                    yield event
                                except GeneratorExit:
                                    closing = True
                                    raise
                            retry_ms = parser.retry_ms if parser.retry_ms is not None else retry_ms
            except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as err:
                error = ConnectionFailed(f"cannot reach {self.base_url}: {type(err).__name__}")
            except httpx.TransportError as err:
                if closing:
                    return  # closing the response of a stream the caller left failed: nothing to tell
                error = ConnectionFailed(f"GET {c.EVENTS_PATH}: {type(err).__name__}", code="TRANSPORT_ERROR")
            if error is not None and c.fatal(error, self._retry):
                raise error
            if connected and not reconnect:
                if error is None:
                    return
                raise error
            if connected:
                delay = c.reconnect_delay(reconnect_delay, retry_ms, failures, error, self._retry)
            else:
                assert error is not None  # without a 200 there is an error
                first = self._retry.delay(error, failures)
                if first is None:
                    raise error
                delay = first
            await asyncio.sleep(delay)
            failures += 1

    async def call_engine(
        self, user_id: str, method: str, path: str, *, json: object | None = None,
        params: Mapping[str, str | int] | None = None, content: bytes | None = None,
        headers: Mapping[str, str] | None = None, admission: Admission | None = None,
        auto_provision: bool = True, auto_wake: bool = True,
    ) -> httpx.Response:
        """Admit (unless `admission` is given), call the engine with its key, and on the engine's 401
        INVALID_KEY / KEY_ROTATION_PENDING re-admit once to pick up a rotated key. Returns the engine's
        response as is. Raises NotAdmitted and the admit errors."""
        adm = admission or await self.admit(user_id, auto_provision, auto_wake)
        for last in (False, True):
            engine = adm.require()
            assert engine.url is not None and engine.api_key is not None
            response = await self._engines.request(
                method, engine_url(engine.url, path), json=json, params=params, content=content,
                headers={**(headers or {}), "X-Engine-Key": engine.api_key},
            )
            if last or not key_rejected(response):
                return response
            adm = await self.admit(user_id, auto_provision, auto_wake)
        raise AssertionError("unreachable")

    # --- admin calls ---------------------------------------------------------------------------------
    async def register_product(
        self, slug: str, display_name: str, policy: Mapping[str, object] | None = None
    ) -> RegisteredProduct:
        """Register a product; its platform key is in the result, shown once (ProductSlugExists)."""
        return await self._run(c.register_product(slug, display_name, policy))

    async def set_policy(self, product_id: str, policy: Mapping[str, object]) -> Json:
        """Replace the product's whole policy; returns it (ProductNotFound, ValidationError)."""
        return await self._run(c.set_policy(product_id, policy))

    async def products(self) -> list[Product]:
        return await self._run(c.products())

    async def get_product(self, product_id: str) -> Product:
        """One product with `engines`, the count of its engines, warm pool included (ProductNotFound,
        also while it is being deleted)."""
        return await self._run(c.get_product(product_id))

    async def delete_product(self, product_id: str) -> ProductDeletion:
        """Delete the product and every engine of it, with their data; its platform key stops working
        as the delete starts (ProductNotFound). When engines are left the server answers 503: the
        product stays deleted, its reconciler finishes, and a repeated call (the retry policy makes a
        few) takes the deletion up where it is; after the last attempt, ServiceUnavailable."""
        return await self._run(c.delete_product(product_id))

    async def rotate_platform_key(self, product_id: str, overlap_seconds: int = 0) -> PlatformKey:
        """A new platform key for the product, shown once: `product_id, key = ...` (the key stays out of
        `repr`). The replaced key keeps working `overlap_seconds` (0 to 86400; 0: refused at once);
        rotating again within the overlap drops the oldest key at once (ProductNotFound,
        ValidationError)."""
        return await self._run(c.rotate_platform_key(product_id, overlap_seconds))

    async def product_engines(
        self, product_id: str, status: str | None = None, limit: int = 100, offset: int = 0
    ) -> EnginePage:
        return await self._run(c.product_engines(product_id, status, limit, offset))

    async def product_engine(self, product_id: str, user_id: str) -> Engine:
        """One engine of a product, without its key."""
        return await self._run(c.product_engine(product_id, user_id))

    async def product_metrics(self, product_id: str) -> FleetMetrics:
        return await self._run(c.product_metrics(product_id))

    async def audit(
        self, product_id: str | None = None, limit: int = 50, after_id: int = 0, action: str | None = None
    ) -> list[AuditEvent]:
        """Newest first; with `after_id`, the events after it oldest first (for tailing)."""
        return await self._run(c.audit(product_id, limit, after_id, action))

    async def set_webhook(self, product_id: str, url: str) -> WebhookSecret:
        """Set the product's webhook (events are POSTed there, signed); returns the URL and the new
        signing secret, shown once: `url, secret = await bap.set_webhook(...)` (ProductNotFound,
        ValidationError). Check the requests with `verify_signature`."""
        return await self._run(c.set_webhook(product_id, url))

    async def get_webhook(self, product_id: str) -> Webhook:
        """The product's webhook and its delivery state, never its secret (WebhookNotFound)."""
        return await self._run(c.get_webhook(product_id))

    async def delete_webhook(self, product_id: str) -> None:
        """Remove the product's webhook: no more events are sent (WebhookNotFound)."""
        await self._run(c.delete_webhook(product_id))

    async def admin_start(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_action(product_id, user_id, "start"))

    async def admin_stop(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_action(product_id, user_id, "stop"))

    async def admin_destroy(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_destroy(product_id, user_id))

    async def admin_rotate_key(self, product_id: str, user_id: str) -> EngineAction:
        """Rotate as the admin: the new key is not returned (the product gets it from admit or get)."""
        return await self._run(c.admin_rotate_key(product_id, user_id))
