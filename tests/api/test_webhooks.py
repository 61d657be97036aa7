"""PUT/GET/DELETE /products/{product_id}/webhook: the contract, its errors, and the secret's life.

The app runs without workers here (nothing is delivered): these tests see only what the API reads and
writes. Delivery itself is tests/workers/test_webhook_delivery.py.
"""

from __future__ import annotations

import uuid

import httpx
import pytest
from cryptography.fernet import Fernet
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, assert_envelope, audit_rows_containing, pk, pool_of, register_product
from tests.log_scan import record_secrets

ADMIN = {"X-Admin-Key": ADMIN_KEY}
URL = "https://receiver.example/hooks/bap?tenant=1"


def hook(product_id: str) -> str:
    return f"/products/{product_id}/webhook"


async def put(client: httpx.AsyncClient, product_id: str, url: str = URL) -> str:
    r = await client.put(hook(product_id), json={"url": url}, headers=ADMIN)
    assert r.status_code == 200, r.text
    doc = r.json()
    assert set(doc) == {"url", "secret"} and doc["url"] == url
    record_secrets(doc["secret"])  # no log line of the run may hold it
    return str(doc["secret"])


async def emit(app: FastAPI, product_id: str, n: int, action: str = "stop") -> None:
    await pool_of(app).execute(
        "INSERT INTO audit_log (product_id, action, actor) SELECT $1, $2, 'system' FROM generate_series(1, $3)",
        product_id, action, n)


async def test_put_get_delete(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client)
    secret = await put(client, product_id)
    assert secret.startswith("whsec_") and len(secret) >= len("whsec_") + 43  # 32 random bytes, URL-safe
    assert secret[len("whsec_"):].replace("-", "").replace("_", "").isalnum()

    r = await client.get(hook(product_id), headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json() == {"url": URL, "pending": 0, "last_status": None, "last_delivery_at": None}
    assert secret not in r.text

    await emit(app, product_id, 3)
    await emit(app, product_id, 2, "health_check")  # not events: never pending
    await emit(app, product_id, 1, "admit_denied")
    assert (await client.get(hook(product_id), headers=ADMIN)).json()["pending"] == 3

    r = await client.delete(hook(product_id), headers=ADMIN)
    assert r.status_code == 200 and r.json() == {"status": "deleted"}
    assert_envelope(await client.get(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")
    assert_envelope(await client.delete(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")


async def test_a_new_webhook_starts_after_the_events_before_it(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client)
    await emit(app, product_id, 4)  # before the webhook: never sent
    await put(client, product_id)
    assert (await client.get(hook(product_id), headers=ADMIN)).json()["pending"] == 0
    await emit(app, product_id, 2)
    assert (await client.get(hook(product_id), headers=ADMIN)).json()["pending"] == 2


async def test_a_new_put_makes_a_new_secret_and_keeps_the_cursor(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client)
    first = await put(client, product_id)
    await emit(app, product_id, 2)
    second = await put(client, product_id, "http://127.0.0.1:9/other")
    assert second != first
    doc = (await client.get(hook(product_id), headers=ADMIN)).json()
    assert doc["url"] == "http://127.0.0.1:9/other" and doc["pending"] == 2  # nothing skipped


async def test_the_secret_is_sealed_at_rest_and_never_shown_again(client: httpx.AsyncClient, app: FastAPI,
                                                                   settings: Settings, pg_dsn: str) -> None:
    product_id, _ = await register_product(client)
    secret = await put(client, product_id)
    row = await pool_of(app).fetchrow("SELECT * FROM webhooks WHERE product_id = $1", product_id)
    assert row is not None
    assert secret not in str(dict(row))
    assert settings.master_key is not None
    assert Fernet(settings.master_key.encode()).decrypt(row["secret_enc"].encode()).decode() == secret
    assert row["deployment"] == settings.deployment
    for method in ("GET", "DELETE"):
        r = await client.request(method, hook(product_id), headers=ADMIN)
        assert secret not in r.text
    assert await audit_rows_containing(pg_dsn, [secret]) == []


async def test_unknown_product(client: httpx.AsyncClient) -> None:
    for product_id in (str(uuid.uuid4()), "not-a-uuid"):
        assert_envelope(await client.put(hook(product_id), json={"url": URL}, headers=ADMIN), 404,
                        "PRODUCT_NOT_FOUND")
        assert_envelope(await client.get(hook(product_id), headers=ADMIN), 404, "PRODUCT_NOT_FOUND")
        assert_envelope(await client.delete(hook(product_id), headers=ADMIN), 404, "PRODUCT_NOT_FOUND")


async def test_no_webhook(client: httpx.AsyncClient) -> None:
    product_id, _ = await register_product(client)
    assert_envelope(await client.get(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")
    assert_envelope(await client.delete(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")


@pytest.mark.parametrize("body", [
    {"url": "ftp://receiver.example/x"},
    {"url": "receiver.example/x"},
    {"url": "http://"},
    {"url": "http:///path"},
    {"url": "https://receiver.example:99999/"},
    {"url": "https://receiver.example/a b"},
    {"url": "https://receiver.example/\n"},
    {"url": "https://receiver.example/" + "x" * 1980},  # 2001 characters
    {"url": ""},
    {"url": 5},
    {"url": None},
    {},
    {"url": URL, "secret": "whsec_mine"},
    {"url": URL, "events": ["provision"]},
], ids=lambda b: repr(b)[:40])
async def test_bad_bodies(client: httpx.AsyncClient, body: dict[str, object]) -> None:
    product_id, _ = await register_product(client)
    r = await client.put(hook(product_id), json=body, headers=ADMIN)
    assert_envelope(r, 400, "VALIDATION_ERROR")
    assert "whsec_" not in r.text
    assert_envelope(await client.get(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")  # nothing set


async def test_not_json(client: httpx.AsyncClient) -> None:
    product_id, _ = await register_product(client)
    r = await client.put(hook(product_id), content=b"url=http://x", headers={**ADMIN, "content-type": "text/plain"})
    assert_envelope(r, 400, "VALIDATION_ERROR")


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8080/hook", "HTTPS://Receiver.Example", "https://user:pass@receiver.example/p?q=1#f",
    "http://[::1]:65535/", "https://receiver.example/" + "x" * 1975,  # 2000 characters
])
async def test_good_urls(client: httpx.AsyncClient, url: str) -> None:
    product_id, _ = await register_product(client)
    await put(client, product_id, url)
    assert (await client.get(hook(product_id), headers=ADMIN)).json()["url"] == url


async def test_admin_key_required(client: httpx.AsyncClient) -> None:
    product_id, platform_key = await register_product(client)
    for headers in ({}, {"X-Admin-Key": "wrong-" + uuid.uuid4().hex}, pk(platform_key)):
        assert_envelope(await client.put(hook(product_id), json={"url": URL}, headers=headers), 401,
                        "INVALID_ADMIN_KEY")
        assert_envelope(await client.get(hook(product_id), headers=headers), 401, "INVALID_ADMIN_KEY")
        assert_envelope(await client.delete(hook(product_id), headers=headers), 401, "INVALID_ADMIN_KEY")
    assert_envelope(await client.get(hook(product_id), headers=ADMIN), 404, "WEBHOOK_NOT_FOUND")  # none was set


async def test_head_and_allow(client: httpx.AsyncClient) -> None:
    product_id, _ = await register_product(client)
    await put(client, product_id)
    head = await client.head(hook(product_id), headers=ADMIN)
    assert (head.status_code, head.content) == (200, b"") and int(head.headers["content-length"]) > 0
    r = await client.request("OPTIONS", hook(product_id), headers=ADMIN)
    assert_envelope(r, 405, "METHOD_NOT_ALLOWED")
    assert {m.strip() for m in r.headers["allow"].split(",")} == {"GET", "HEAD", "PUT", "DELETE"}
    for method in ("POST", "PATCH"):
        assert (await client.request(method, hook(product_id), headers=ADMIN)).status_code == 405
    # no body, no key: the key is checked first
    assert_envelope(await client.put(hook(product_id)), 401, "INVALID_ADMIN_KEY")
    assert_envelope(await client.put(hook(product_id), headers=ADMIN), 400, "VALIDATION_ERROR")


async def test_pending_is_capped(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client)
    await put(client, product_id)
    await emit(app, product_id, 10_005)
    assert (await client.get(hook(product_id), headers=ADMIN)).json()["pending"] == 10_000  # "at least"


async def test_documented_in_openapi(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    ops = doc["paths"]["/products/{product_id}/webhook"]
    assert set(ops) == {"put", "get", "delete"}
    for op in ops.values():
        assert {"AdminKey"} <= {name for req in op.get("security", []) for name in req}
        assert "WEBHOOK_NOT_FOUND" in op["responses"]["404"]["description"] or op is ops["put"]
    body = ops["put"]["requestBody"]["content"]["application/json"]["schema"]
    schema = doc["components"]["schemas"][body["$ref"].rsplit("/", 1)[1]] if "$ref" in body else body
    assert schema["additionalProperties"] is False and schema["properties"]["url"]["maxLength"] == 2000
    assert "secret" in doc["components"]["schemas"]["WebhookSecretOut"]["properties"]
    assert "secret" not in doc["components"]["schemas"]["WebhookOut"]["properties"]
