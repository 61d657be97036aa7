"""Property tests: whatever a caller sends as user_id or body, never a 5xx, and every non-2xx
answer is exactly the envelope. Products here have max_engines=0, so no example boots an engine.
"""

from __future__ import annotations

import json
import os
import re
from urllib.parse import quote

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bap_engine.api.models import SLUG_PATTERN, USER_ID_PATTERN
from tests.conftest import ADMIN_KEY, pk, pool_of, register_product

EXAMPLES = settings(max_examples=int(os.environ.get("BAP_PROPERTY_EXAMPLES", "60")), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
VALID_USER_ID = re.compile(USER_ID_PATTERN)

# strings a database or a shell may choke on, and integers beyond every column's range
nasty = st.sampled_from(["\x00", "a\x00b", "\n", "../x", "'; DROP TABLE engines; --", "%00", "\u202e", "ab c"])
texts = st.text(max_size=20) | nasty
json_scalars = (st.none() | st.booleans() | st.integers() | st.integers(-(2**80), 2**80) | st.floats(allow_nan=False)
                | texts)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=8), inner, max_size=3), max_leaves=8)
user_ids = st.from_regex(VALID_USER_ID, fullmatch=True) | st.text(min_size=1, max_size=140) | nasty
# "/" in a path segment is another route (and "." / ".." are dot segments): covered in test_errors
path_user_ids = user_ids.filter(lambda u: "/" not in u and u not in (".", ".."))


def assert_contract(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text)
    if not 200 <= r.status_code < 300:
        doc = r.json()
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}, doc
        assert isinstance(doc["error"]["code"], str) and isinstance(doc["error"]["message"], str)


def body_of(value: object) -> bytes:
    return value if isinstance(value, bytes) else json.dumps(value).encode()


@pytest.fixture
async def key(client: httpx.AsyncClient) -> str:
    """A product that may have no engine at all."""
    _, platform_key = await register_product(client, policy={"max_engines": 0})
    return platform_key


@EXAMPLES
@given(user_id=path_user_ids, route=st.sampled_from(["", "/start", "/stop", "/rotate-key", "/admit"]),
       method=st.sampled_from(["GET", "POST", "DELETE"]))
async def test_any_user_id_in_a_path(client: httpx.AsyncClient, key: str, user_id: str, route: str,
                                     method: str) -> None:
    r = await client.request(method, f"/engines/{quote(user_id, safe='')}{route}", headers=pk(key))
    assert_contract(r)
    allowed = (route == "" and method in ("GET", "DELETE")) or (route != "" and method == "POST")
    if not allowed:
        assert r.status_code == 405
    elif not VALID_USER_ID.fullmatch(user_id):
        assert r.status_code == 400 and r.json()["error"]["code"] == "VALIDATION_ERROR"
    elif route == "/admit":
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}
    else:
        assert r.status_code == 404 and r.json()["error"]["code"] == "ENGINE_NOT_FOUND"


provision_bodies = st.one_of(
    st.fixed_dictionaries({"user_id": user_ids}, optional={"engine_version": st.text(max_size=30) | json_scalars}),
    st.fixed_dictionaries({"user_id": json_values}),
    st.dictionaries(st.sampled_from(["user_id", "engine_version", "extra", ""]), json_values, max_size=3),
    json_values,
    st.binary(max_size=64),
)


@EXAMPLES
@given(body=provision_bodies)
async def test_any_provision_body(client: httpx.AsyncClient, key: str, body: object) -> None:
    r = await client.post("/engines/provision", content=body_of(body),
                          headers=pk(key) | {"content-type": "application/json"})
    assert_contract(r)
    assert r.status_code in (400, 429)  # quota 0: a valid body is refused after validation
    if r.status_code == 429:
        assert isinstance(body, dict) and VALID_USER_ID.fullmatch(body["user_id"])


admit_bodies = st.one_of(
    st.fixed_dictionaries({}, optional={"auto_provision": json_scalars, "auto_wake": json_scalars}),
    st.dictionaries(st.sampled_from(["auto_provision", "auto_wake", "x"]), st.booleans(), max_size=3),
    json_values,
    st.binary(max_size=64),
)


@EXAMPLES
@given(body=admit_bodies, user_id=path_user_ids)
async def test_any_admit_body(client: httpx.AsyncClient, key: str, body: object, user_id: str) -> None:
    r = await client.post(f"/engines/{quote(user_id, safe='')}/admit", content=body_of(body), headers=pk(key))
    assert_contract(r)
    assert r.status_code in (200, 400, 429)
    if r.status_code == 200:
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}
    if r.status_code == 429:
        assert r.json()["error"]["code"] == "QUOTA_EXCEEDED"


slugs = st.from_regex(re.compile(SLUG_PATTERN), fullmatch=True)
policies = st.fixed_dictionaries({}, optional={
    "max_engines": json_scalars, "rate_limit_rpm": json_scalars, "engine_version": json_scalars,
    "warm_pool": json_scalars})
register_bodies = st.one_of(
    st.fixed_dictionaries({"slug": slugs, "display_name": nasty | st.text(min_size=1, max_size=30)},
                          optional={"policy": policies}),
    st.fixed_dictionaries({"slug": slugs | st.text(max_size=70), "display_name": st.text(max_size=210) | json_scalars},
                          optional={"policy": policies | json_values}),
    json_values,
    st.binary(max_size=64),
)


@EXAMPLES
@given(body=register_bodies)
async def test_any_register_body(client: httpx.AsyncClient, app: FastAPI, body: object) -> None:
    r = await client.post("/products/register", content=body_of(body),
                          headers={"X-Admin-Key": ADMIN_KEY, "content-type": "application/json"})
    assert_contract(r)
    assert r.status_code in (200, 400, 409)
    if r.status_code == 200:
        doc = r.json()
        assert set(doc) == {"product_id", "slug", "platform_api_key"}
        assert isinstance(body, dict) and doc["slug"] == body["slug"]
        stored = await pool_of(app).fetchval("SELECT policy FROM products WHERE id = $1", doc["product_id"])
        assert stored == body.get("policy", {})
