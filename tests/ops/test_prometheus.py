"""GET /metrics/prometheus: admin bearer, gauges from the database, audit-log counters and histograms,
per-replica admits and admit latency, worker health."""

from __future__ import annotations

import asyncio
import itertools

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from bap_engine.app import create_app
from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, assert_envelope, pk, register_product

BEARER = {"Authorization": f"Bearer {ADMIN_KEY}"}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    for (n, lbls), v in found.items():
        if n == name and set(labels.items()) <= set(lbls):
            return v
    raise AssertionError(f"no sample {name}{labels}")


async def test_prometheus_auth_and_figures(client: httpx.AsyncClient, app: FastAPI) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": ADMIN_KEY}, {"X-Admin-Key": ADMIN_KEY}):
        assert_envelope(await client.get("/metrics/prometheus", headers=headers), 401, "INVALID_ADMIN_KEY")

    product_id, key = await register_product(client)
    slug = next(p["slug"] for p in (await client.get("/products", headers={"X-Admin-Key": ADMIN_KEY})).json()[
        "products"] if p["product_id"] == product_id)
    r = await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))
    assert r.status_code == 200, r.text
    assert (await client.post("/engines/u1/admit", headers=pk(key))).json()["admitted"] is True
    assert (await client.post("/engines/ghost/admit", headers=pk(key))).json()["reason"] == "engine_not_found"
    await app.state.services.discovery.flush()  # denials are coalesced and written in batches

    r = await client.get("/metrics/prometheus", headers=BEARER)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    found = samples(r.text)
    replica = app.state.metrics.replica
    assert value(found, "bap_engines", product=slug, state="running") == 1
    assert value(found, "bap_engines", product=slug, state="failed") == 0
    assert value(found, "bap_provisions_total", product=slug) == 1
    assert value(found, "bap_destroys_total", product=slug) == 0
    assert value(found, "bap_crashes_total", product=slug) == 0
    assert value(found, "bap_restarts_total", product=slug) == 0
    assert value(found, "bap_admits_total", product=slug, replica=replica) == 1
    assert value(found, "bap_admit_denials_total", product=slug, reason="engine_not_found") == 1
    assert value(found, "bap_engine_boot_seconds_count", product=slug) == 1
    assert value(found, "bap_engine_boot_seconds_bucket", product=slug, le="+Inf") == 1
    assert value(found, "bap_engine_boot_seconds_sum", product=slug) > 0
    assert value(found, "bap_admit_latency_seconds_count", replica=replica, outcome="admitted") == 1
    assert value(found, "bap_admit_latency_seconds_count", replica=replica, outcome="denied") == 1
    assert value(found, "bap_leader", replica=replica) == 0  # workers are off in these tests

    assert (await client.delete("/engines/u1", headers=pk(key))).status_code == 200
    found = samples((await client.get("/metrics/prometheus", headers=BEARER)).text)
    assert value(found, "bap_engines", product=slug, state="running") == 0
    assert value(found, "bap_destroys_total", product=slug) == 1


async def test_prometheus_public_when_configured(settings: Settings) -> None:
    public = create_app(settings.model_copy(update={"metrics_public": True}))
    async with LifespanManager(public, startup_timeout=60, shutdown_timeout=60):
        transport = httpx.ASGITransport(app=public)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            r = await c.get("/metrics/prometheus")
    assert r.status_code == 200
    assert "bap_leader" in r.text and "bap_engines" in r.text


async def test_state_seconds_are_monotonic(client: httpx.AsyncClient, app: FastAPI) -> None:
    """bap_engine_state_seconds_total: closed intervals (table state_seconds) plus the open ones of live
    engines; neither the exported counter nor the database figure ever goes down across transitions."""
    product_id, key = await register_product(client)
    slug = next(p["slug"] for p in (await client.get("/products", headers={"X-Admin-Key": ADMIN_KEY})).json()[
        "products"] if p["product_id"] == product_id)
    fleet = app.state.services.fleet

    async def figures() -> tuple[dict[str, float], dict[str, float]]:
        """(exported, from the database) seconds by state for this product."""
        text = (await client.get("/metrics/prometheus", headers=BEARER)).text
        family = next(f for f in text_string_to_metric_families(text) if f.name == "bap_engine_state_seconds")
        assert family.type == "counter"
        exported = {s.labels["state"]: s.value for s in family.samples
                    if s.name == "bap_engine_state_seconds_total" and s.labels["product"] == slug}
        raw = {state: seconds for pid, state, seconds in await fleet.state_seconds() if pid == product_id}
        return exported, raw

    exported, raw = await figures()
    assert exported == {"running": 0, "sleeping": 0, "stopped": 0} and raw == {}
    assert (await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))).status_code == 200
    history = [await figures()]
    for path, method in (("/engines/u1/stop", "POST"), ("/engines/u1/start", "POST"), ("/engines/u1", "DELETE")):
        await asyncio.sleep(0.4)
        history.append(await figures())
        assert (await client.request(method, path, headers=pk(key))).status_code == 200, path
        history.append(await figures())
    for (before, raw_before), (after, raw_after) in itertools.pairwise(history):
        for state in ("running", "sleeping", "stopped"):
            assert after[state] >= before[state], (state, before, after)
            assert raw_after.get(state, 0.0) >= raw_before.get(state, 0.0) - 1e-6, (state, raw_before, raw_after)
    final, raw_final = history[-1]
    # provisioned, ~0.4 s, stopped, ~0.4 s, started, ~0.4 s, destroyed (closed by the delete trigger)
    assert final["running"] >= 0.75 and final["stopped"] >= 0.35 and final["sleeping"] == 0
    assert raw_final["running"] == final["running"] and raw_final["stopped"] == final["stopped"]
    await asyncio.sleep(0.2)
    assert (await figures())[0] == final  # nothing is open any more: nothing grows
