"""Every error code reachable through the API, each in the exact envelope."""

from __future__ import annotations

import shlex
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import (
    ADMIN_KEY,
    ResponseLog,
    assert_envelope,
    engine_dir,
    insert_engine_row,
    open_app,
    pk,
    pool_of,
    register_product,
    services_of,
    unique_slug,
)

ENGINE_ROUTES = [
    ("GET", "/engines/{u}"),
    ("DELETE", "/engines/{u}"),
    ("POST", "/engines/{u}/start"),
    ("POST", "/engines/{u}/stop"),
    ("POST", "/engines/{u}/rotate-key"),
    ("POST", "/engines/{u}/admit"),
]
PLATFORM_ROUTES = [*ENGINE_ROUTES, ("POST", "/engines/provision"), ("GET", "/engines"), ("GET", "/status"),
                   ("GET", "/metrics")]
ADMIN = {"X-Admin-Key": ADMIN_KEY}


# ---- 400 VALIDATION_ERROR ---------------------------------------------------------------------
BAD_PROVISION_BODIES: list[bytes | dict[str, object] | list[object]] = [
    b"{not json",
    b"",
    b"null",
    [1, 2],
    "just a string",  # type: ignore[list-item]
    {},
    {"engine_version": "v1"},
    {"user_id": 5},
    {"user_id": None},
    {"user_id": ["u"]},
    {"user_id": "u1", "extra": 1},
    {"user_id": "../x"},
    {"user_id": "..%2Fx"},
    {"user_id": "a/b"},
    {"user_id": "with space"},
    {"user_id": ""},
    {"user_id": "-leading-dash"},
    {"user_id": "a" * 129},
    {"user_id": "u1\n"},
    {"user_id": "ünï"},
    {"user_id": "u1", "engine_version": 5},
    {"user_id": "u1", "engine_version": ""},
    {"user_id": "u1", "engine_version": "has space"},
    {"user_id": "u1", "engine_version": "v\x00"},  # NUL cannot be stored: once a 500
    {"user_id": "u1", "engine_version": "v\x01"},
]


async def test_provision_validation(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key = await register_product(client)
    for body in BAD_PROVISION_BODIES:
        if isinstance(body, bytes):
            r = await client.post("/engines/provision", content=body,
                                  headers=pk(key) | {"content-type": "application/json"})
        else:
            r = await client.post("/engines/provision", json=body, headers=pk(key))
        assert_envelope(r, 400, "VALIDATION_ERROR")
    # no content type at all is not a way around validation either
    assert_envelope(await client.post("/engines/provision", headers=pk(key)), 400, "VALIDATION_ERROR")
    assert await pool_of(app).fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0


async def test_provision_accepts_longest_user_id_pattern(client: httpx.AsyncClient, app: FastAPI) -> None:
    """128 characters is the limit: the same check with 128 passes validation (quota stops it, no boot)."""
    _, key = await register_product(client, policy={"max_engines": 0})
    r = await client.post("/engines/provision", json={"user_id": "a" * 128}, headers=pk(key))
    assert_envelope(r, 429, "QUOTA_EXCEEDED")
    r = await client.post("/engines/provision", json={"user_id": "a" * 129}, headers=pk(key))
    assert_envelope(r, 400, "VALIDATION_ERROR")


ADMIT_BAD = [
    b"{oops",
    b"[]",
    b"5",
    b'"yes"',
    b'{"auto_provision": "yes"}',
    b'{"auto_provision": 1}',
    b'{"auto_wake": "true"}',
    b'{"auto_wake": null}',
    b'{"auto_provision": true, "unknown": 1}',
]


async def test_admit_validation(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for body in ADMIT_BAD:
        r = await client.post("/engines/u1/admit", content=body,
                              headers=pk(key) | {"content-type": "application/json"})
        assert_envelope(r, 400, "VALIDATION_ERROR")


BAD_PATH_USER_IDS = ["with%20space", "a" * 129, "-x", "_x", "a%00b", "%C3%BC", "a%3Fb", "a*b", "a$b"]


async def test_bad_user_id_in_path(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for method, route in ENGINE_ROUTES:
        for bad in BAD_PATH_USER_IDS:
            r = await client.request(method, route.format(u=bad), headers=pk(key))
            assert_envelope(r, 400, "VALIDATION_ERROR")


async def test_path_traversal_user_id_never_reaches_an_engine_route(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for path in ("/engines/../x", "/engines/..%2Fx", "/engines/%2E%2E%2Fx/start", "/engines/a%2Fb/stop"):
        r = await client.post(path, headers=pk(key)) if "/st" in path else await client.get(path, headers=pk(key))
        assert r.status_code in (400, 404), (path, r.status_code)
        assert_envelope(r, r.status_code, "VALIDATION_ERROR" if r.status_code == 400 else "NOT_FOUND")


async def test_list_query_validation(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for query in ("limit=0", "limit=1001", "limit=abc", "limit=-1", "limit=1.5", "limit=", "offset=-1",
                  "offset=abc", "status=bogus", "status=RUNNING", "sort=created_at"):
        r = await client.get(f"/engines?{query}", headers=pk(key))
        assert_envelope(r, 400, "VALIDATION_ERROR")
    for query in ("limit=1", "limit=1000", "offset=0", "offset=5000", "status=failed"):
        r = await client.get(f"/engines?{query}", headers=pk(key))
        assert r.status_code == 200 and r.json() == {"engines": [], "total": 0}, query


BAD_POLICIES: list[object] = [
    {"bogus": 1},
    {"max_engines": "5"},
    {"max_engines": True},
    {"max_engines": 1.5},
    {"max_engines": -1},
    {"rate_limit_rpm": 0},
    {"rate_limit_rpm": "10"},
    {"engine_version": 3},
    {"engine_version": ""},
    {"warm_pool": 101},
    {"warm_pool": False},
    {"engine_version": "v\x00"},  # NUL cannot be stored: once a 500
    {"max_engines": 2**70},  # beyond 64 bits: once a 500
    {"rate_limit_rpm": 2**40},  # beyond int4: accepted, then every admit was a 500
    {"max_engines": 2**31},
    [],
    "open",
    None,
]


async def test_policy_validation_on_register_and_update(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client, policy={"max_engines": 2})
    for policy in BAD_POLICIES:
        slug = unique_slug()
        r = await client.post("/products/register", headers=ADMIN,
                              json={"slug": slug, "display_name": "x", "policy": policy})
        assert_envelope(r, 400, "VALIDATION_ERROR")
        assert await pool_of(app).fetchval("SELECT count(*) FROM products WHERE slug = $1", slug) == 0
        r = await client.put(f"/products/{product_id}/policy", headers=ADMIN, json={"policy": policy})
        assert_envelope(r, 400, "VALIDATION_ERROR")
    stored = await pool_of(app).fetchval("SELECT policy FROM products WHERE id = $1", product_id)
    assert stored == {"max_engines": 2}
    actions = await pool_of(app).fetch("SELECT action FROM audit_log WHERE product_id = $1", product_id)
    assert [r["action"] for r in actions] == ["policy_register"]  # refused updates are not audited


REGISTER_BAD: list[object] = [
    {}, {"slug": "ok-slug"}, {"display_name": "x"}, {"slug": "Upper", "display_name": "x"},
    {"slug": "-x", "display_name": "x"}, {"slug": "a" * 64, "display_name": "x"}, {"slug": "a_b", "display_name": "x"},
    {"slug": 5, "display_name": "x"}, {"slug": "ok", "display_name": ""}, {"slug": "ok", "display_name": 3},
    {"slug": "ok", "display_name": "a\x00b"},  # NUL cannot be stored: once a 500
    {"slug": "ok", "display_name": "x", "extra": True}, [], None,
]


async def test_register_and_policy_body_validation(client: httpx.AsyncClient) -> None:
    for body in REGISTER_BAD:
        r = await client.post("/products/register", headers=ADMIN, json=body)
        assert_envelope(r, 400, "VALIDATION_ERROR")
    assert_envelope(await client.post("/products/register", headers=ADMIN, content=b"{bad"), 400,
                    "VALIDATION_ERROR")
    product_id, _ = await register_product(client)
    for body in ({}, {"policy": {}, "extra": 1}, {"max_engines": 1}, {"policy": 5}, []):
        r = await client.put(f"/products/{product_id}/policy", headers=ADMIN, json=body)
        assert_envelope(r, 400, "VALIDATION_ERROR")


# ---- 401 ----------------------------------------------------------------------------------------
async def test_invalid_platform_key(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for method, route in PLATFORM_ROUTES:
        body = {"user_id": "u1"} if route == "/engines/provision" else None
        path = route.format(u="u1")
        for headers in ({}, {"X-Platform-Key": ""}, {"X-Platform-Key": key + "x"},
                        {"X-Platform-Key": "pk-sept-nope"}, {"X-Platform-Key": ADMIN_KEY}, {"X-Admin-Key": ADMIN_KEY}):
            r = await client.request(method, path, headers=headers, json=body)
            assert_envelope(r, 401, "INVALID_PLATFORM_KEY")


async def test_invalid_admin_key(client: httpx.AsyncClient) -> None:
    product_id, key = await register_product(client)
    for headers in ({}, {"X-Admin-Key": ""}, {"X-Admin-Key": ADMIN_KEY + "x"}, {"X-Admin-Key": key},
                    {"X-Platform-Key": key}, {"X-Admin-Key": ADMIN_KEY[:-1]}):
        r = await client.post("/products/register", headers=headers, json={"slug": unique_slug(), "display_name": "x"})
        assert_envelope(r, 401, "INVALID_ADMIN_KEY")
        r = await client.put(f"/products/{product_id}/policy", headers=headers, json={"policy": {}})
        assert_envelope(r, 401, "INVALID_ADMIN_KEY")


# ---- 404 / 405 / 413 -----------------------------------------------------------------------------
async def test_engine_not_found(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for method, route in ENGINE_ROUTES[:-1]:
        r = await client.request(method, route.format(u="ghost"), headers=pk(key))
        assert_envelope(r, 404, "ENGINE_NOT_FOUND")


async def test_product_not_found(client: httpx.AsyncClient) -> None:
    for product_id in ("00000000-0000-0000-0000-000000000000", "not-a-uuid", "1"):
        r = await client.put(f"/products/{product_id}/policy", headers=ADMIN, json={"policy": {}})
        assert_envelope(r, 404, "PRODUCT_NOT_FOUND")


async def test_unknown_route_and_wrong_method(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for method, path in (("GET", "/nope"), ("POST", "/engines/u1/explode"), ("GET", "/no/such/route"),
                         ("GET", "/engines/u1/admit/x")):
        assert_envelope(await client.request(method, path, headers=pk(key)), 404, "NOT_FOUND")
    for method, path in (("PATCH", "/products/register"), ("PUT", "/engines/u1"), ("GET", "/engines/u1/start"),
                         ("DELETE", "/engines"), ("POST", "/health"), ("GET", "/engines/provision/admit"),
                         ("PATCH", "/status")):
        assert_envelope(await client.request(method, path, headers=pk(key)), 405, "METHOD_NOT_ALLOWED")
    # GET/DELETE /products/register are GET/DELETE /products/{product_id} of the product "register" (not a
    # product id), as GET /engines/provision is the user named "provision"
    assert_envelope(await client.get("/products/register", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
    assert_envelope(await client.delete("/products/register", headers=ADMIN), 404, "PRODUCT_NOT_FOUND")


async def test_trailing_slash_is_an_unknown_route_in_the_envelope(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    assert_envelope(await client.get("/engines/", headers=pk(key)), 404, "NOT_FOUND")


async def test_payload_too_large(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key = await register_product(client)
    big = b'{"user_id": "u1", "engine_version": "' + b"x" * (64 * 1024) + b'"}'
    r = await client.post("/engines/provision", content=big, headers=pk(key) | {"content-type": "application/json"})
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    r = await client.post("/engines/u1/admit", content=b"{" + b" " * (64 * 1024) + b"}", headers=pk(key))
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    r = await client.post("/products/register", headers=ADMIN,
                          content=b'{"slug": "x", "display_name": "' + b"y" * 70000 + b'"}')
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")
    assert await pool_of(app).fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
    # exactly 64 KiB is still accepted (and then validated)
    edge = b'{"auto_provision": false}'
    edge = edge[:-1] + b" " * (64 * 1024 - len(edge)) + b"}"
    r = await client.post("/engines/u1/admit", content=edge, headers=pk(key))
    assert r.status_code == 200 and r.json()["reason"] == "engine_not_found"


async def test_payload_too_large_chunked(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"auto_provision": false'
        for _ in range(80):
            yield b" " * 1024
        yield b"}"

    r = await client.post("/engines/u1/admit", content=chunks(), headers=pk(key))
    assert_envelope(r, 413, "PAYLOAD_TOO_LARGE")


# ---- 409 ----------------------------------------------------------------------------------------
async def test_product_slug_exists(client: httpx.AsyncClient) -> None:
    slug = unique_slug()
    await register_product(client, slug=slug)
    r = await client.post("/products/register", headers=ADMIN, json={"slug": slug, "display_name": "again"})
    assert_envelope(r, 409, "PRODUCT_SLUG_EXISTS")


async def test_state_conflicts(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    """409s that never reach the backend, on bare rows: already exists / not running / already running / busy."""
    product_id, key = await register_product(client)
    pool = pool_of(app)
    await insert_engine_row(pool, settings, product_id, "stopped-user", "stopped")
    await insert_engine_row(pool, settings, product_id, "running-user", "running")
    await insert_engine_row(pool, settings, product_id, "failed-user", "failed")
    busy_id = await insert_engine_row(pool, settings, product_id, "busy-user", "running")
    owner = services_of(app).lifecycle.owner_id  # a live owner: this very process
    await pool.execute("UPDATE engines SET op = 'stop', op_owner = $2, op_deadline = now() + interval '1 hour' "
                       "WHERE id = $1", busy_id, owner)

    for user in ("stopped-user", "running-user"):
        r = await client.post("/engines/provision", json={"user_id": user}, headers=pk(key))
        assert_envelope(r, 409, "ENGINE_ALREADY_EXISTS")
    for user in ("stopped-user", "failed-user"):
        assert_envelope(await client.post(f"/engines/{user}/stop", headers=pk(key)), 409, "ENGINE_NOT_RUNNING")
        assert_envelope(await client.post(f"/engines/{user}/rotate-key", headers=pk(key)), 409,
                        "ENGINE_NOT_RUNNING")
    assert_envelope(await client.post("/engines/running-user/start", headers=pk(key)), 409,
                    "ENGINE_ALREADY_RUNNING")
    for method, route in ENGINE_ROUTES[1:-1]:
        r = await client.request(method, route.format(u="busy-user"), headers=pk(key))
        assert_envelope(r, 409, "ENGINE_BUSY")
    # a refused transition leaves the row as it was, op released
    rows = await pool.fetch("SELECT user_id, status, op FROM engines WHERE product_id = $1 ORDER BY user_id",
                            product_id)
    assert [(r["user_id"], r["status"], r["op"]) for r in rows] == [
        ("busy-user", "running", "stop"), ("failed-user", "failed", None), ("running-user", "running", None),
        ("stopped-user", "stopped", None)]


# ---- 429 / 503 ------------------------------------------------------------------------------------
async def test_quota_exceeded(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    product_id, key = await register_product(client, policy={"max_engines": 0})
    r = await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))
    assert_envelope(r, 429, "QUOTA_EXCEEDED")
    r = await client.post("/engines/u1/admit", json={"auto_provision": True}, headers=pk(key))
    assert_envelope(r, 429, "QUOTA_EXCEEDED")
    assert "Retry-After" not in r.headers
    # every state counts toward max_engines, and tightening destroys nothing
    await insert_engine_row(pool_of(app), settings, product_id, "old", "stopped")
    r = await client.put(f"/products/{product_id}/policy", headers=ADMIN, json={"policy": {"max_engines": 1}})
    assert r.status_code == 200
    assert_envelope(await client.post("/engines/provision", json={"user_id": "u2"}, headers=pk(key)), 429,
                    "QUOTA_EXCEEDED")
    await client.put(f"/products/{product_id}/policy", headers=ADMIN, json={"policy": {"max_engines": 0}})
    assert (await client.get("/engines/old", headers=pk(key))).json()["status"] == "stopped"
    assert await pool_of(app).fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 1


async def test_port_exhaustion(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    other_id, _ = await register_product(client)
    pool = pool_of(app)
    for i, port in enumerate(range(settings.port_min, settings.port_max + 1)):
        await insert_engine_row(pool, settings, other_id, f"holder-{i}", "stopped", port=port)
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "u1"}, headers=pk(key))
    assert_envelope(r, 503, "PORT_EXHAUSTION")
    r = await client.post("/engines/u1/admit", json={"auto_provision": True}, headers=pk(key))
    assert_envelope(r, 503, "PORT_EXHAUSTION")
    assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0


# ---- 504 / 502: real failing engine commands ------------------------------------------------------
async def test_boot_timeout(settings: Settings, tmp_path: Path, response_log: ResponseLog) -> None:
    pidfile = tmp_path / "sleeper.pid"
    script = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)"
    command = shlex.join([sys.executable, "-c", script, str(pidfile)])
    slow = settings.model_copy(update={"engine_command": command, "boot_timeout_s": 1.0})
    async with open_app(slow, response_log) as (app, client):
        product_id, key = await register_product(client)
        r = await client.post("/engines/provision", json={"user_id": "slow"}, headers=pk(key))
        assert_envelope(r, 504, "BOOT_TIMEOUT")
        pool = pool_of(app)
        assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
        rows = await pool.fetch("SELECT action, engine_id, user_id, metadata FROM audit_log WHERE product_id = $1 "
                                "AND action LIKE 'provision%'", product_id)
        assert len(rows) == 1 and rows[0]["action"] == "provision_failed"
        assert rows[0]["user_id"] == "slow" and rows[0]["metadata"]["error"] == "BOOT_TIMEOUT"
        assert not engine_dir(slow, rows[0]["engine_id"]).exists()
        assert _live_with(str(pidfile)) == [], "the engine process outlived its failed provision"
        assert_envelope(await client.get("/engines/slow", headers=pk(key)), 404, "ENGINE_NOT_FOUND")
        # nothing was left held: the user can be provisioned again (and fails the same way)
        r = await client.post("/engines/slow/admit", json={"auto_provision": True}, headers=pk(key))
        assert_envelope(r, 504, "BOOT_TIMEOUT")
        assert _live_with(str(pidfile)) == []
        assert pidfile.exists()  # the engine really ran


async def test_backend_error(settings: Settings, tmp_path: Path, response_log: ResponseLog) -> None:
    broken = settings.model_copy(update={"engine_command": str(tmp_path / "no-such-engine-binary")})
    async with open_app(broken, response_log) as (app, client):
        product_id, key = await register_product(client)
        r = await client.post("/engines/provision", json={"user_id": "b1"}, headers=pk(key))
        assert_envelope(r, 502, "BACKEND_ERROR")
        r = await client.post("/engines/b2/admit", json={"auto_provision": True}, headers=pk(key))
        assert_envelope(r, 502, "BACKEND_ERROR")
        pool = pool_of(app)
        assert await pool.fetchval("SELECT count(*) FROM engines WHERE product_id = $1", product_id) == 0
        rows = await pool.fetch("SELECT user_id, metadata FROM audit_log WHERE product_id = $1 "
                                "AND action = 'provision_failed' ORDER BY id", product_id)
        assert [(r["user_id"], r["metadata"]["error"]) for r in rows] == [("b1", "BACKEND_ERROR"),
                                                                         ("b2", "BACKEND_ERROR")]
    assert not (settings.data_dir / "engines").exists() or not any((settings.data_dir / "engines").iterdir())


def _live_with(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains marker."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker not in (proc / "cmdline").read_bytes().decode(errors="replace"):
                continue
            stat = (proc / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        if stat[stat.rindex(")") + 2] not in "ZX":
            found.append(int(proc.name))
    return found
