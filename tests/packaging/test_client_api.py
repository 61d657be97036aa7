"""`bap_engine.client` re-exports `bap_engine_client`; the generated sync client matches the async one
method for method and behaves the same (typed errors, Retry-After retries) on a mock transport."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import bap_engine_client as client
import httpx
import pytest
from bap_engine_client import AsyncBapClient, BapClient, EngineNotFound, MissingKey, RateLimited, RetryPolicy

import bap_engine.client as legacy

Handler = Callable[[httpx.Request], httpx.Response]
# The sync names of the async-only dunders and methods.
RENAMED = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


def test_legacy_module_reexports_every_public_name() -> None:
    assert set(legacy.__all__) == set(client.__all__) - {"__version__"}
    for name in legacy.__all__:
        assert getattr(legacy, name) is getattr(client, name), name


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {RENAMED.get(name, name): inspect.signature(fn) for name, fn in vars(cls).items()
            if callable(fn) and (not name.startswith("_") or name.startswith("__"))}


def test_sync_and_async_clients_have_the_same_methods_and_parameters() -> None:
    sync, async_ = _methods(BapClient), _methods(AsyncBapClient)
    assert sync.keys() == async_.keys()
    for name, sig in sync.items():
        assert list(sig.parameters) == list(async_[name].parameters), name
        for param, value in sig.parameters.items():
            assert value.default == async_[name].parameters[param].default, (name, param)
    for name, fn in vars(AsyncBapClient).items():
        if callable(fn) and name in ("admit", "aclose", "iter_engines", "__aexit__"):
            assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn), name
            assert not inspect.iscoroutinefunction(getattr(BapClient, RENAMED.get(name, name)))


def _flaky_admit(calls: list[httpx.Request]) -> Handler:
    """First admit: 429 with Retry-After 0; the second: admitted. GET /engines/*: ENGINE_NOT_FOUND."""

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"code": "ENGINE_NOT_FOUND", "message": "engine not found"}})
        if len(calls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"},
                                  json={"error": {"code": "RATE_LIMITED", "message": "rate limit exceeded"}})
        engine = {"engine_id": "e1", "user_id": "u1", "status": "running", "url": "http://127.0.0.1:9", "api_key": "k"}
        return httpx.Response(200, json={"admitted": True, "engine": engine})

    return handle


def test_sync_client_retries_and_raises_typed_errors() -> None:
    calls: list[httpx.Request] = []
    with BapClient("http://bap.test", platform_key="pk", transport=httpx.MockTransport(_flaky_admit(calls))) as bap:
        adm = bap.admit("u1")
        assert adm.admitted and adm.url == "http://127.0.0.1:9" and "k" not in repr(adm.engine)
        assert [c.headers["X-Platform-Key"] for c in calls] == ["pk", "pk"]
        with pytest.raises(EngineNotFound) as err:
            bap.get("u1")
        assert err.value.status == 404 and err.value.code == "ENGINE_NOT_FOUND"
    with BapClient("http://bap.test", transport=httpx.MockTransport(_flaky_admit([]))) as bap, \
            pytest.raises(MissingKey):
        bap.admit("u1")


async def test_async_client_retries_and_raises_typed_errors() -> None:
    calls: list[httpx.Request] = []
    no_retry = RetryPolicy(attempts=1)
    transport = httpx.MockTransport(_flaky_admit(calls))
    async with AsyncBapClient("http://bap.test", platform_key="pk", transport=transport, retry=no_retry) as bap:
        with pytest.raises(RateLimited) as err:
            await bap.admit("u1")
        assert err.value.retry_after == 0.0
        assert (await bap.admit("u1")).admitted
    async with AsyncBapClient("http://bap.test", platform_key="pk", transport=httpx.MockTransport(
            _flaky_admit([]))) as bap:
        assert (await bap.admit("u1")).admitted  # the 429 is retried after Retry-After
