"""Query and path parameters are range-checked before they reach SQL: every bad value is a 400
VALIDATION_ERROR (a bad product id in a path is 404 PRODUCT_NOT_FOUND), never a 500, on the platform
routes and the admin ones alike. Each value below was a 500, or silently no filter, before."""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest

from bap_engine.api.params import MAX_QUERY_INT
from bap_engine.states import EngineState
from tests.conftest import ADMIN_KEY, assert_envelope, pk, register_product

ADMIN = {"X-Admin-Key": ADMIN_KEY}
BAD_INTEGERS = ["9223372036854775808", str(MAX_QUERY_INT + 1), "1" * 5000, "-1", "²", "٥", "+5", " 5", "5 ", "5.0",
                "1_0", "1e3", "", "0x10", "five"]
BAD_LIMITS = ["0", "1001", *BAD_INTEGERS]
BAD_STATUSES = ["", "RUNNING", "bogus", "running ", "null"]


@pytest.fixture
async def product(client: httpx.AsyncClient) -> tuple[str, str]:
    return await register_product(client)


def _listings(product_id: str, key: str) -> list[tuple[str, dict[str, str]]]:
    return [("/engines", pk(key)), (f"/products/{product_id}/engines", ADMIN)]


async def test_engine_listings_check_every_parameter(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    for path, headers in _listings(*product):
        for name, values in (("offset", BAD_INTEGERS), ("limit", BAD_LIMITS), ("status", BAD_STATUSES)):
            for value in values:
                r = await client.get(f"{path}?{name}={quote(value)}", headers=headers)
                assert r.status_code == 400, (path, name, value, r.status_code, r.text)
                assert_envelope(r, 400, "VALIDATION_ERROR")
        assert_envelope(await client.get(f"{path}?bogus=1", headers=headers), 400, "VALIDATION_ERROR")
        for query in (f"offset={MAX_QUERY_INT}", "limit=1", "limit=1000", "offset=0", *(
                f"status={s}" for s in EngineState)):
            r = await client.get(f"{path}?{query}", headers=headers)
            assert r.status_code == 200 and r.json() == {"engines": [], "total": 0}, (path, query, r.text)


async def test_audit_queries_check_every_parameter(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    product_id, _ = product
    for path in (f"/products/{product_id}/audit", "/audit"):
        for name, values in (("after_id", BAD_INTEGERS), ("limit", BAD_LIMITS),
                             ("action", ["", "a;b", "Provision", "x" * 65, "é"])):
            for value in values:
                r = await client.get(f"{path}?{name}={quote(value)}", headers=ADMIN)
                assert r.status_code == 400, (path, name, value, r.status_code, r.text)
                assert_envelope(r, 400, "VALIDATION_ERROR")
        r = await client.get(f"{path}?after_id={MAX_QUERY_INT}&action=policy_register", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"events": []}, r.text
    for value in ("null", "", "not-a-uuid", "urn:uuid:" + product_id, "{" + product_id + "}",
                  product_id.replace("-", "")):
        assert_envelope(await client.get(f"/audit?product_id={quote(value)}", headers=ADMIN), 400, "VALIDATION_ERROR")
    r = await client.get(f"/audit?product_id={product_id.upper()}&action=policy_register", headers=ADMIN)
    assert [e["product_id"] for e in r.json()["events"]] == [product_id]


async def test_product_ids_in_paths_that_name_no_product(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    product_id, _ = product
    # uuid.UUID reads these, Postgres does not: each was a 500
    for value in ("urn:uuid:" + product_id, "{" + product_id + "}", product_id.replace("-", ""), product_id + "\n"):
        for method, path, body in (("GET", "/products/{}/engines", None), ("GET", "/products/{}/metrics", None),
                                   ("PUT", "/products/{}/policy", {"policy": {}}),
                                   ("POST", "/products/{}/engines/u1/stop", None)):
            r = await client.request(method, path.format(quote(value, safe="")), headers=ADMIN, json=body)
            assert_envelope(r, 404, "PRODUCT_NOT_FOUND")
    r = await client.get(f"/products/{product_id.upper()}/engines", headers=ADMIN)
    assert r.status_code == 200 and r.json()["total"] == 0


async def test_integral_numbers_in_a_policy(client: httpx.AsyncClient, product: tuple[str, str]) -> None:
    product_id, _ = product
    r = await client.put(f"/products/{product_id}/policy", headers=ADMIN,
                         json={"policy": {"max_engines": 5.0, "rate_limit_rpm": 60}})
    assert r.status_code == 200 and r.json() == {"policy": {"max_engines": 5, "rate_limit_rpm": 60}}, r.text
    assert isinstance(r.json()["policy"]["max_engines"], int)
    for policy in ({"max_engines": 5.5}, {"max_engines": True}, {"max_engines": "5"}, {"warm_pool": 1.5}):
        r = await client.put(f"/products/{product_id}/policy", headers=ADMIN, json={"policy": policy})
        assert_envelope(r, 400, "VALIDATION_ERROR")
