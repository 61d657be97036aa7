"""The Python client against a real `bap-engine serve` (real Postgres, real engines)."""

from __future__ import annotations

import httpx
import pytest

from bap_engine.client import (
    Admission,
    AsyncBapClient,
    BapClient,
    EngineNotFound,
    EngineNotRunning,
    InvalidAdminKey,
    InvalidPlatformKey,
    MissingKey,
    NotAdmitted,
    ProductSlugExists,
    RateLimited,
    RetryPolicy,
)
from tests.ops.conftest import OpsProduct, OpsServer


def test_admit_call_rotate_and_lifecycle(bap: BapClient, ops_server: OpsServer) -> None:
    adm = bap.admit("alice")
    assert adm.admitted and adm.url and adm.api_key and adm.engine is not None
    assert adm.api_key not in repr(adm)  # keys stay out of reprs
    old = adm
    r = bap.call_engine("alice", "GET", "/history")
    assert r.status_code == 200, r.text

    # Two rotations retire the first key for good: the engine answers 401 INVALID_KEY to it.
    first = bap.rotate_key("alice")
    second = bap.rotate_key("alice")
    assert len({old.api_key, first.api_key, second.api_key}) == 3
    assert old.url is not None
    assert httpx.get(f"{old.url}/history", headers={"X-Engine-Key": old.api_key or ""}).status_code == 401
    # A caller holding the stale admission gets through: one re-admit picks up the rotated key.
    r = bap.call_engine("alice", "GET", "/history", admission=old)
    assert r.status_code == 200, r.text
    assert bap.get("alice").api_key == second.api_key
    ops_server.secrets += [k for k in (old.api_key, first.api_key, second.api_key) if k]

    assert bap.stop("alice").status == "stopped"
    with pytest.raises(EngineNotRunning):
        bap.rotate_key("alice")
    denied = bap.admit("alice")
    assert (denied.admitted, denied.reason) == (False, "engine_stopped")
    with pytest.raises(NotAdmitted) as info:
        bap.call_engine("alice", "GET", "/history")
    assert info.value.reason == "engine_stopped"
    assert bap.start("alice").status == "running"

    page = bap.list_engines()
    assert page.total == 1 and page.engines[0].user_id == "alice" and page.engines[0].api_key is None
    assert [e.user_id for e in bap.iter_engines(status="running")] == ["alice"]
    status = bap.status()
    assert status.total == 1 and status.by_status["running"] == 1 and status.health == "ok"
    assert bap.metrics().total_provisions == 1

    assert bap.destroy("alice").status == "destroyed"
    with pytest.raises(EngineNotFound) as err:
        bap.get("alice")
    assert err.value.status == 404 and err.value.code == "ENGINE_NOT_FOUND"


def test_errors_are_typed(ops_server: OpsServer, admin: BapClient, product: OpsProduct) -> None:
    with BapClient(ops_server.url, platform_key="pk-sept-wrong") as bad:
        with pytest.raises(InvalidPlatformKey):
            bad.status()
        with pytest.raises(MissingKey):
            bad.products()
    with BapClient(ops_server.url, admin_key="wrong") as bad:
        with pytest.raises(InvalidAdminKey):
            bad.products()
    with pytest.raises(ProductSlugExists):
        admin.register_product(product.slug, "again")
    assert admin.health() is True


def test_rate_limited_carries_retry_after(ops_server: OpsServer, admin: BapClient, product: OpsProduct) -> None:
    assert admin.set_policy(product.product_id, {"rate_limit_rpm": 1}) == {"rate_limit_rpm": 1}
    no_retry = RetryPolicy(attempts=1)
    with BapClient(ops_server.url, platform_key=product.platform_key, retry=no_retry) as bap:
        assert bap.admit("nobody", auto_provision=False).reason == "engine_not_found"
        with pytest.raises(RateLimited) as info:
            bap.admit("nobody", auto_provision=False)
    assert info.value.retry_after is not None and 1 <= info.value.retry_after <= 60
    # A Retry-After longer than the policy allows is not waited for.
    short = RetryPolicy(attempts=3, max_retry_after_s=0.01)
    with BapClient(ops_server.url, platform_key=product.platform_key, retry=short) as bap:
        with pytest.raises(RateLimited):
            bap.admit("nobody", auto_provision=False)


def test_retries_honour_retry_after() -> None:
    """Transient answers are retried, waiting Retry-After; a quota error is not (no server can send a
    sub-second Retry-After on demand, so this one runs on a stub transport)."""
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if len(seen) == 1:
            return httpx.Response(429, headers={"Retry-After": "0"},
                                  json={"error": {"code": "RATE_LIMITED", "message": "slow down"}})
        if len(seen) == 2:
            return httpx.Response(503, json={"error": {"code": "SERVICE_UNAVAILABLE", "message": "starting"}})
        return httpx.Response(200, json={"admitted": False, "engine": None, "reason": "engine_sleeping"})

    retry = RetryPolicy(attempts=3, backoff_s=0.001)
    with BapClient("http://stub", platform_key="pk", transport=httpx.MockTransport(handler), retry=retry) as bap:
        assert bap.admit("u", auto_wake=False) == Admission(False, None, "engine_sleeping")
    assert len(seen) == 3

    def quota(request: httpx.Request) -> httpx.Response:
        seen.append("quota")
        return httpx.Response(429, json={"error": {"code": "QUOTA_EXCEEDED", "message": "full"}})

    seen.clear()
    with BapClient("http://stub", platform_key="pk", transport=httpx.MockTransport(quota), retry=retry) as bap:
        with pytest.raises(Exception) as info:
            bap.provision("u")
    assert type(info.value).__name__ == "QuotaExceeded" and seen == ["quota"]


async def test_async_client(ops_server: OpsServer, product: OpsProduct) -> None:
    async with AsyncBapClient(ops_server.url, platform_key=product.platform_key,
                              admin_key=ops_server.admin_key) as bap:
        engine = await bap.provision("bob")
        assert engine.status == "running" and engine.api_key
        ops_server.secrets.append(engine.api_key)
        r = await bap.call_engine("bob", "GET", "/history")
        assert r.status_code == 200
        assert [e.user_id async for e in bap.iter_engines()] == ["bob"]
        products = {p.product_id: p for p in await bap.products()}
        assert products[product.product_id].by_status["running"] == 1
        assert (await bap.admin_stop(product.product_id, "bob")).status == "stopped"
        assert (await bap.product_engine(product.product_id, "bob")).status == "stopped"
        assert (await bap.destroy("bob")).status == "destroyed"
        assert [e.action for e in await bap.audit(product.product_id, limit=10)][:3] == ["destroy", "stop",
                                                                                        "provision"]
