"""`AsyncBapClient`: the asyncio client (httpx.AsyncClient).

The source of both clients: `_sync.py` (`BapClient`) is generated from this file by
`scripts/gen_sync.py` (await and async dropped, Async names swapped for their sync twins), and a
test fails when the committed `_sync.py` differs from the generator's output. Edit this file, then
run `python clients/python/scripts/gen_sync.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import TypeVar

import httpx

from bap_engine_client import _calls as c
from bap_engine_client._calls import DEFAULT_URL, USER_AGENT, Call, Keys, RetryPolicy, engine_url, key_rejected
from bap_engine_client._errors import BapClientError, ConnectionFailed, error_from_response
from bap_engine_client._models import (
    Admission,
    AuditEvent,
    Engine,
    EngineAction,
    EnginePage,
    FleetMetrics,
    FleetStatus,
    Json,
    Product,
    RegisteredProduct,
)

__all__ = ["AsyncBapClient"]

T = TypeVar("T")


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

    async def admin_start(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_action(product_id, user_id, "start"))

    async def admin_stop(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_action(product_id, user_id, "stop"))

    async def admin_destroy(self, product_id: str, user_id: str) -> EngineAction:
        return await self._run(c.admin_destroy(product_id, user_id))

    async def admin_rotate_key(self, product_id: str, user_id: str) -> EngineAction:
        """Rotate as the admin: the new key is not returned (the product gets it from admit or get)."""
        return await self._run(c.admin_rotate_key(product_id, user_id))
