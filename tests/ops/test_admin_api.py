"""Admin read endpoints and engine actions for operators (X-Admin-Key), as the dashboard uses them."""

from __future__ import annotations

import uuid

import httpx

from tests.conftest import ADMIN_KEY, assert_envelope, pk, register_product

ADM = {"X-Admin-Key": ADMIN_KEY}


async def test_admin_reads_and_actions(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client, policy={"max_engines": 5})
    r = await client.post("/engines/provision", json={"user_id": "carol"}, headers=pk(key))
    assert r.status_code == 200, r.text
    base = f"/products/{product_id}"

    products = {p["product_id"]: p for p in (await client.get("/products", headers=ADM)).json()["products"]}
    mine = products[product_id]
    assert mine["total"] == 1 and mine["by_status"]["running"] == 1 and set(mine["by_status"]) == {
        "provisioning", "running", "sleeping", "stopped", "failed", "destroying"}
    assert mine["policy"] == {"max_engines": 5} and mine["created_at"].endswith("Z")

    listing = (await client.get(f"{base}/engines", headers=ADM)).json()
    assert listing["total"] == 1 and "api_key" not in listing["engines"][0]
    assert (await client.get(f"{base}/engines?status=stopped", headers=ADM)).json() == {"engines": [], "total": 0}
    one = (await client.get(f"{base}/engines/carol", headers=ADM)).json()
    assert one["user_id"] == "carol" and one["status"] == "running" and "api_key" not in one

    metrics = (await client.get(f"{base}/metrics", headers=ADM)).json()
    assert metrics["provisions_1h"] == 1 and metrics["boot_ms"]["samples"] == 1
    buckets = metrics["boot_ms"]["buckets"]
    assert sum(b["count"] for b in buckets) == 1 and buckets[-1]["le"] is None

    r = await client.post(f"{base}/engines/carol/stop", headers=ADM)
    assert r.status_code == 200 and r.json()["status"] == "stopped"
    assert (await client.get("/engines/carol", headers=pk(key))).json()["status"] == "stopped"
    assert_envelope(await client.post(f"{base}/engines/carol/stop", headers=ADM), 409, "ENGINE_NOT_RUNNING")
    assert (await client.post(f"{base}/engines/carol/start", headers=ADM)).json()["status"] == "running"

    before = (await client.get("/engines/carol", headers=pk(key))).json()["api_key"]
    r = await client.post(f"{base}/engines/carol/rotate-key", headers=ADM)
    assert r.status_code == 200 and set(r.json()) == {"engine_id", "user_id", "status", "url"}
    assert (await client.get("/engines/carol", headers=pk(key))).json()["api_key"] != before

    events = (await client.get(f"{base}/audit?limit=10", headers=ADM)).json()["events"]
    assert [e["action"] for e in events][:4] == ["rotate_key", "start", "stop", "provision"]
    assert events[0]["actor"] == "admin" and events[-1]["action"] == "policy_register"
    after = (await client.get(f"{base}/audit?after_id={events[2]['id']}", headers=ADM)).json()["events"]
    assert [e["action"] for e in after] == ["start", "rotate_key"]  # oldest first when tailing
    only = (await client.get(f"/audit?product_id={product_id}&action=stop", headers=ADM)).json()["events"]
    assert [e["action"] for e in only] == ["stop"]

    r = await client.delete(f"{base}/engines/carol", headers=ADM)
    assert r.status_code == 200 and r.json()["status"] == "destroyed"
    assert_envelope(await client.get("/engines/carol", headers=pk(key)), 404, "ENGINE_NOT_FOUND")


async def test_admin_errors(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client)
    base = f"/products/{product_id}"
    for method, path in [("GET", "/products"), ("GET", f"{base}/engines"), ("GET", f"{base}/engines/u"),
                         ("GET", f"{base}/metrics"), ("GET", f"{base}/audit"),
                         ("POST", f"{base}/engines/u/stop"), ("POST", f"{base}/engines/u/start"),
                         ("POST", f"{base}/engines/u/rotate-key"), ("DELETE", f"{base}/engines/u")]:
        assert_envelope(await client.request(method, path), 401, "INVALID_ADMIN_KEY")
        assert_envelope(await client.request(method, path, headers=pk(key)), 401, "INVALID_ADMIN_KEY")
    # GET /audit also takes a platform key (the product's own rows, tests/api/test_audit_query.py)
    assert_envelope(await client.get("/audit"), 401, "INVALID_ADMIN_KEY")
    assert set((await client.get("/audit", headers=pk(key))).json()) == {"events", "next_cursor"}
    for missing in (str(uuid.uuid4()), "not-a-uuid"):
        assert_envelope(await client.get(f"/products/{missing}/engines", headers=ADM), 404, "PRODUCT_NOT_FOUND")
        assert_envelope(await client.post(f"/products/{missing}/engines/u/stop", headers=ADM), 404,
                        "PRODUCT_NOT_FOUND")
    assert_envelope(await client.get(f"/audit?product_id={uuid.uuid4()}", headers=ADM), 404, "PRODUCT_NOT_FOUND")
    assert_envelope(await client.post(f"{base}/engines/nobody/stop", headers=ADM), 404, "ENGINE_NOT_FOUND")
    assert_envelope(await client.get(f"{base}/engines/nobody", headers=ADM), 404, "ENGINE_NOT_FOUND")
    assert_envelope(await client.get(f"{base}/engines/bad%20id", headers=ADM), 400, "VALIDATION_ERROR")
    for query in ("limit=0", "limit=abc", "limit=1001", "after_id=-1", "bogus=1", "action=a;b"):
        assert_envelope(await client.get(f"{base}/audit?{query}", headers=ADM), 400, "VALIDATION_ERROR")
    for query in ("status=zombie", "limit=0", "offset=-1"):
        assert_envelope(await client.get(f"{base}/engines?{query}", headers=ADM), 400, "VALIDATION_ERROR")
