"""The one adapter boundary to `kubernetes_asyncio`: client construction and error mapping.

`Api` builds the async client lazily (first call, never at import or construction) and
`translated()` is the only place that turns the SDK's exceptions into `base` errors:
ApiException -> BackendError with the API's reason (5xx/429 transient), aiohttp/OS
errors and timeouts -> BackendError(transient=True). Callers that give 404 or 409 a
meaning catch `ApiException` themselves via `status_of`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import kubernetes_asyncio.client
import kubernetes_asyncio.config

from bap_engine.backends import base

__all__ = ["Api", "ApiException", "REQUEST_TIMEOUT_S", "translated", "status_of"]

# kubernetes_asyncio ships py.typed but its generated code is unannotated; keeping it behind
# `Any` here spares every caller `type: ignore[no-untyped-call]`.
_client: Any = kubernetes_asyncio.client
_config: Any = kubernetes_asyncio.config
ApiException: type[Exception] = _client.exceptions.ApiException
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
REQUEST_TIMEOUT_S = 30


def status_of(exc: BaseException) -> int | None:
    """HTTP status of an ApiException (None for anything else)."""
    if isinstance(exc, ApiException):
        status = getattr(exc, "status", None)
        return status if isinstance(status, int) else None
    return None


def _message(exc: BaseException) -> str:
    """The API's own `Status.message` (never headers: they may carry tokens)."""
    body = getattr(exc, "body", None)
    try:
        data = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return str(data["message"])[:300]
    return str(getattr(exc, "reason", "") or type(exc).__name__)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """Map SDK/transport errors raised inside the block to base.BackendError."""
    try:
        yield
    except base.BackendError:
        raise
    except ApiException as exc:
        status = status_of(exc)
        raise base.BackendError(
            f"{what}: Kubernetes API {status}: {_message(exc)}", transient=status in _TRANSIENT_STATUS
        ) from exc
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        raise base.BackendError(f"{what}: Kubernetes API unreachable: {exc}", transient=True) from exc


class Api:
    """Lazily-built CoreV1/AppsV1 clients sharing one aiohttp session."""

    def __init__(self, kubeconfig: str | None) -> None:
        self._kubeconfig = kubeconfig
        self._api_client: Any = None
        self._core: Any = None
        self._apps: Any = None
        self._lock = asyncio.Lock()

    async def _load_configuration(self) -> Any:
        configuration = _client.Configuration()
        if self._kubeconfig is not None:
            await _config.load_kube_config(config_file=self._kubeconfig, client_configuration=configuration)
            return configuration
        try:  # in a pod: the mounted service-account token
            _config.load_incluster_config(client_configuration=configuration)
        except _config.ConfigException:  # outside: the library's default kubeconfig lookup
            await _config.load_kube_config(client_configuration=configuration)
        return configuration

    async def _ensure(self) -> None:
        if self._api_client is not None:
            return
        async with self._lock:
            if self._api_client is not None:
                return
            try:
                configuration = await self._load_configuration()
            except (_config.ConfigException, OSError, ValueError, TypeError) as exc:
                raise base.BackendError(f"Kubernetes configuration not usable: {exc}") from exc
            configuration.connection_pool_maxsize = 32
            api_client = _client.ApiClient(configuration)
            self._core = _client.CoreV1Api(api_client)
            self._apps = _client.AppsV1Api(api_client)
            self._api_client = api_client

    async def core(self) -> Any:
        await self._ensure()
        return self._core

    async def apps(self) -> Any:
        await self._ensure()
        return self._apps

    async def ping(self) -> None:
        """One cheap authenticated call (GET /version). Raises BackendError."""
        await self._ensure()
        try:
            await _client.VersionApi(self._api_client).get_code(_request_timeout=10)
        except (TimeoutError, ApiException, aiohttp.ClientError, OSError) as exc:
            detail = _message(exc) if isinstance(exc, ApiException) else str(exc) or type(exc).__name__
            raise base.BackendError(f"Kubernetes API unreachable: {detail}", transient=True) from exc

    async def close(self) -> None:
        api_client, self._api_client = self._api_client, None
        if api_client is not None:
            await api_client.close()
