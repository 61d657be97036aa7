"""HEAD on every GET route, and a 405's Allow header listing exactly the methods the path serves.

Both are checked on every route of the app's route table; the Allow check is behavioural (each listed
method is served, each other one is 405), so it does not restate how the server computes the header.
"""

from __future__ import annotations

import httpx
from fastapi import FastAPI

from tests.api.route_table import route_table
from tests.conftest import ADMIN_KEY, assert_envelope, client_for, pk, register_product

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
GHOST_PRODUCT = "00000000-0000-4000-8000-000000000000"  # names no product: path-parameterised calls are 404s
# An endless stream: a GET through the ASGI transport (which reads the whole body) never returns.
# Its HEAD, Allow and key checks run against a live server in tests/api/test_events.py.
STREAMING = {"/events"}


async def test_head_answers_like_get_without_a_body(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "head-user"}, headers=pk(key))
    assert r.status_code == 200, r.text
    gets = [route for route in route_table(app) if route.method == "GET" and route.path not in STREAMING]
    assert len(gets) >= 15
    async with client_for(app) as raw:  # the recording client reads every 2xx JSON answer's body
        for route in gets:
            url, headers = route.url(product_id, "head-user"), route.credentials(key, ADMIN_KEY)
            got, head = await client.get(url, headers=headers), await raw.head(url, headers=headers)
            assert head.status_code == got.status_code, (route, head.status_code, got.status_code)
            assert head.content == b"", route
            assert head.headers["content-type"] == got.headers["content-type"], route
            assert int(head.headers["content-length"]) > 0, route
        # a probe that knows nothing but HEAD
        head = await raw.head("/health")
        assert (head.status_code, head.headers["content-length"], head.content) == (200, "15", b"")


async def test_head_where_get_is_not_served_is_405(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    r = await client.head("/engines/provision/admit", headers=pk(key))
    assert (r.status_code, r.headers["allow"], r.content) == (405, "POST", b"")


async def test_allow_lists_exactly_the_methods_each_path_serves(client: httpx.AsyncClient, app: FastAPI) -> None:
    _, key = await register_product(client)
    headers = pk(key) | {"X-Admin-Key": ADMIN_KEY, "Authorization": f"Bearer {ADMIN_KEY}"}
    urls = sorted({route.url(GHOST_PRODUCT, "ghost-user") for route in route_table(app)
                   if route.path not in STREAMING})
    async with client_for(app) as raw:  # HEAD answers are 2xx JSON without a body: not for the recorder
        for url in urls:
            r = await client.request("OPTIONS", url, headers=headers)
            assert_envelope(r, 405, "METHOD_NOT_ALLOWED")
            allowed = {m.strip() for m in r.headers["allow"].split(",")}
            assert allowed and allowed <= set(METHODS), (url, allowed)
            for method in METHODS:  # no body: whatever runs stops at validation or at a missing engine/product
                status = (await raw.request(method, url, headers=headers)).status_code
                assert (status != 405) == (method in allowed), (url, method, status, allowed)


async def test_allow_on_paths_shared_by_several_routes(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for method, path, allow in (("PUT", "/engines/u1", "DELETE, GET, HEAD, PATCH"), ("POST", "/health", "GET, HEAD"),
                                ("OPTIONS", "/engines/provision", "DELETE, GET, HEAD, PATCH, POST"),
                                ("GET", "/engines/u1/start", "POST"), ("DELETE", "/engines", "GET, HEAD")):
        r = await client.request(method, path, headers=pk(key))
        assert_envelope(r, 405, "METHOD_NOT_ALLOWED")
        assert r.headers["allow"] == allow, (method, path)
