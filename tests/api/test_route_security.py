"""Security properties checked on every route the app serves, read from its route table (a new route
is covered without touching this file):

- every route either declares a key in the OpenAPI document or is one of the few public ones;
- admin routes refuse a platform key, a wrong key and no key (401 INVALID_ADMIN_KEY);
- platform routes refuse the admin key, a wrong key and no key (401 INVALID_PLATFORM_KEY);
- every engine-scoped route called for another product's user answers 404 ENGINE_NOT_FOUND (admit:
  not admitted, `engine_not_found`).

None of these calls may change anything: the other product's engine keeps its row, status, key, URL
and audit trail, and still answers with its key. Path parameters are filled from the template by name
(`user_id`, `product_id`, else a fresh UUID); a route needing a body gets one from `BODIES`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg
import httpx
from fastapi import FastAPI

from bap_engine.config import DEFAULT_ENGINE_IMAGE
from tests.api.route_table import RouteInfo, route_table
from tests.conftest import ADMIN_KEY, assert_envelope, pk, pool_of, register_product

# Routes that need no key: probes, the dashboard page and its assets (the page asks for the key in the
# browser), and the API's own documentation.
PUBLIC = {("GET", "/health"), ("GET", "/dashboard"), ("GET", "/dashboard/{asset}"), ("GET", "/openapi.json"),
          ("GET", "/docs"), ("GET", "/docs/oauth2-redirect"), ("GET", "/redoc")}
ADMIN_SCHEMES, PLATFORM_SCHEMES = {"AdminKey", "AdminBearer"}, {"PlatformKey"}
# Routes that take either key (X-Admin-Key wins when both are sent; with neither, INVALID_ADMIN_KEY):
# tests/api/test_audit_query.py checks their keys.
EITHER_KEY = {("GET", "/audit")}
# A body that passes validation, for routes that read one (auth and tenancy are decided before it matters).
BODIES: dict[tuple[str, str], dict[str, object]] = {
    ("POST", "/engines/provision"): {"user_id": "newcomer"},
    ("PATCH", "/engines/{user_id}"): {"idle_sleep": "auto"},
    ("POST", "/products/register"): {"slug": "never-registered", "display_name": "x"},
    ("PUT", "/products/{product_id}/policy"): {"policy": {"max_engines": 0}},
    ("POST", "/products/{product_id}/rotate-platform-key"): {"overlap_seconds": 0},
    ("POST", "/engines/{user_id}/admit"): {},
    ("POST", "/engines/{user_id}/upgrade"): {"engine_version": DEFAULT_ENGINE_IMAGE},  # a version the backend has
}
OWNER_USER = "owned-by-a"
WRONG_PLATFORM_KEY = "pk-sept-" + uuid.uuid4().hex + uuid.uuid4().hex


async def _call(client: httpx.AsyncClient, route: RouteInfo, headers: dict[str, str], product_id: str,
                user_id: str = OWNER_USER) -> httpx.Response:
    body = BODIES.get((route.method, route.path))
    return await client.request(route.method, route.url(product_id, user_id), headers=headers, json=body)


@dataclass(frozen=True)
class Snapshot:
    engines: list[tuple[object, ...]]
    products: list[tuple[object, ...]]
    audit_rows: int


async def snapshot(pool: asyncpg.Pool, product_ids: list[str]) -> Snapshot:
    engines = await pool.fetch(
        "SELECT id, product_id, user_id, status, port, url, api_key_hash, engine_key_enc, engine_version "
        "FROM engines WHERE product_id = ANY($1::uuid[]) ORDER BY id", product_ids)
    products = await pool.fetch("SELECT id, slug, policy::text, api_key_hash FROM products "
                                "WHERE id = ANY($1::uuid[]) ORDER BY id", product_ids)
    audit = await pool.fetchval("SELECT count(*) FROM audit_log WHERE product_id = ANY($1::uuid[]) "
                                "AND action <> 'admit_denied'", product_ids)
    return Snapshot([tuple(r) for r in engines], [tuple(r) for r in products], int(audit))


async def owned_engine(client: httpx.AsyncClient) -> tuple[str, str, dict[str, object]]:
    """(product id, platform key, the engine of OWNER_USER): a product with a real running engine."""
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": OWNER_USER}, headers=pk(key))
    assert r.status_code == 200, r.text
    return product_id, key, r.json()


async def assert_untouched(client: httpx.AsyncClient, app: FastAPI, before: Snapshot, product_ids: list[str],
                           key: str, engine: dict[str, object]) -> None:
    assert await snapshot(pool_of(app), product_ids) == before
    r = await client.get(f"/engines/{OWNER_USER}", headers=pk(key))
    assert r.status_code == 200 and (r.json()["status"], r.json()["api_key"]) == ("running", engine["api_key"])


async def test_every_route_declares_a_key_or_is_public(app: FastAPI) -> None:
    for route in route_table(app):
        if (route.method, route.path) in PUBLIC:
            assert not route.schemes, f"{route.method} {route.path} is public but documents a key"
        else:
            assert route.schemes and route.schemes <= ADMIN_SCHEMES | PLATFORM_SCHEMES, (
                f"{route.method} {route.path}: no key in the OpenAPI document; use ProductDep or AdminDep "
                "(or add it to PUBLIC if it really is public)")
            both = bool(route.schemes & ADMIN_SCHEMES and route.schemes & PLATFORM_SCHEMES)
            assert both == ((route.method, route.path) in EITHER_KEY), route


async def test_admin_routes_refuse_platform_keys_and_no_key(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key, engine = await owned_engine(client)
    before = await snapshot(pool_of(app), [product_id])
    admin_routes = [r for r in route_table(app) if r.schemes & ADMIN_SCHEMES and (r.method, r.path) not in EITHER_KEY]
    assert len(admin_routes) >= 10
    refused = [{}, pk(key), {"X-Admin-Key": key}, {"X-Admin-Key": ADMIN_KEY + "x"},
               {"Authorization": f"Bearer {key}"}, {"X-Admin-Key": ""}]
    for route in admin_routes:
        for headers in refused:
            r = await _call(client, route, headers, product_id)
            assert r.status_code == 401, (route, list(headers), r.status_code, r.text)
            assert_envelope(r, 401, "INVALID_ADMIN_KEY")
    await assert_untouched(client, app, before, [product_id], key, engine)
    assert await pool_of(app).fetchval("SELECT count(*) FROM products WHERE slug = 'never-registered'") == 0


async def test_platform_routes_refuse_the_admin_key_and_no_key(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key, engine = await owned_engine(client)
    before = await snapshot(pool_of(app), [product_id])
    platform_routes = [r for r in route_table(app) if r.schemes & PLATFORM_SCHEMES
                       and (r.method, r.path) not in EITHER_KEY]
    assert len(platform_routes) >= 10
    refused = [{}, {"X-Admin-Key": ADMIN_KEY}, pk(ADMIN_KEY), pk(WRONG_PLATFORM_KEY), pk(""),
               {"Authorization": f"Bearer {key}"}]
    for route in platform_routes:
        for headers in refused:
            r = await _call(client, route, headers, product_id)
            assert r.status_code == 401, (route, list(headers), r.status_code, r.text)
            assert_envelope(r, 401, "INVALID_PLATFORM_KEY")
    await assert_untouched(client, app, before, [product_id], key, engine)


async def test_engine_routes_never_reach_another_products_engine(client: httpx.AsyncClient, app: FastAPI) -> None:
    a_id, a_key, engine = await owned_engine(client)
    b_id, b_key = await register_product(client)
    before = await snapshot(pool_of(app), [a_id, b_id])
    scoped = [r for r in route_table(app) if "{user_id}" in r.path and r.schemes]
    assert len(scoped) >= 10
    for route in scoped:
        # as product B (its key, or the admin naming B): A's user does not exist there
        headers = pk(b_key) if route.schemes & PLATFORM_SCHEMES else {"X-Admin-Key": ADMIN_KEY}
        r = await _call(client, route, headers, b_id)
        if route.path.endswith("/admit"):
            assert r.status_code == 200, (route, r.text)
            assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}, route
        else:
            assert r.status_code == 404, (route, r.status_code, r.text)
            assert_envelope(r, 404, "ENGINE_NOT_FOUND")
    await assert_untouched(client, app, before, [a_id, b_id], a_key, engine)
