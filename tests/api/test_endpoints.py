"""Every endpoint's success answer, shape for shape, as spec/API.md defines it (real engines)."""

from __future__ import annotations

import re
import shlex
import sys
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from bap_engine.config import Settings
from tests.conftest import ADMIN_KEY, engine_dir, pk, pool_of, register_product, unique_slug

REFENGINE = shlex.join((sys.executable, "-m", "bap_engine.refengine"))


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings, knowing engine version 'v2' too (an unknown version is refused)."""
    return settings.model_copy(update={"engine_commands": {"v2": REFENGINE}})


ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?Z$")
ENGINE_KEYS = {"engine_id", "user_id", "status", "url", "api_key", "engine_version", "created_at", "last_health_at",
               "idle_sleep"}
STATES = {"provisioning", "running", "sleeping", "stopped", "failed", "destroying"}


def assert_iso_z(value: object) -> datetime:
    assert isinstance(value, str) and ISO_Z.fullmatch(value), value
    ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert ts.tzinfo is not None and ts <= datetime.now(UTC)
    return ts


def assert_uuid(value: object) -> None:
    assert isinstance(value, str)
    assert str(uuid.UUID(value)) == value


def assert_engine_object(doc: dict[str, object], user_id: str, *, with_key: bool = True) -> None:
    expected = ENGINE_KEYS if with_key else ENGINE_KEYS - {"api_key"}
    assert set(doc) == expected, doc
    assert_uuid(doc["engine_id"])
    assert doc["user_id"] == user_id
    assert doc["status"] in STATES
    assert isinstance(doc["engine_version"], str) and doc["engine_version"]
    assert_iso_z(doc["created_at"])
    if doc["last_health_at"] is not None:
        assert_iso_z(doc["last_health_at"])
    if with_key:
        assert isinstance(doc["api_key"], str) and doc["api_key"].startswith("sk-sept-")


async def test_health_ok_without_auth(client: httpx.AsyncClient) -> None:
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}


async def test_register_and_policy_shapes(client: httpx.AsyncClient) -> None:
    slug = unique_slug()
    r = await client.post("/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                          json={"slug": slug, "display_name": "Shapes", "policy": {"max_engines": 3}})
    assert r.status_code == 200
    doc = r.json()
    assert set(doc) == {"product_id", "slug", "platform_api_key"}
    assert_uuid(doc["product_id"])
    assert doc["slug"] == slug
    key = doc["platform_api_key"]
    assert key.startswith("pk-sept-") and len(key) >= len("pk-sept-") + 43  # >= 32 bytes of entropy
    # the key authenticates the product
    assert (await client.get("/engines", headers=pk(key))).status_code == 200

    policy = {"max_engines": 5, "rate_limit_rpm": 100, "engine_version": "v2", "warm_pool": 0}
    r = await client.put(f"/products/{doc['product_id']}/policy", headers={"X-Admin-Key": ADMIN_KEY},
                         json={"policy": policy})
    assert r.status_code == 200
    assert r.json() == {"policy": policy}
    r = await client.put(f"/products/{doc['product_id']}/policy", headers={"X-Admin-Key": ADMIN_KEY},
                         json={"policy": {}})
    assert r.status_code == 200 and r.json() == {"policy": {}}


async def test_register_without_policy_means_no_limits(client: httpx.AsyncClient, app: FastAPI) -> None:
    product_id, _ = await register_product(client)
    policy = await pool_of(app).fetchval("SELECT policy FROM products WHERE id = $1", product_id)
    assert policy == {}


async def test_engine_lifecycle_shapes(client: httpx.AsyncClient, app: FastAPI, settings: Settings) -> None:
    """provision, GET, admit, GET /engines, stop, start, rotate-key, DELETE: exact bodies."""
    _, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "shape-user"}, headers=pk(key))
    assert r.status_code == 200, r.text
    prov = r.json()
    assert set(prov) == {"engine_id", "user_id", "status", "url", "api_key"}
    assert prov["status"] == "running" and prov["user_id"] == "shape-user"
    assert prov["url"].startswith("http://127.0.0.1:")
    assert settings.port_min <= int(prov["url"].rsplit(":", 1)[1]) <= settings.port_max
    assert prov["api_key"].startswith("sk-sept-") and len(prov["api_key"]) >= len("sk-sept-") + 43
    engine_id = prov["engine_id"]
    assert engine_dir(settings, engine_id).is_dir()

    r = await client.get("/engines/shape-user", headers=pk(key))
    assert r.status_code == 200
    got = r.json()
    assert_engine_object(got, "shape-user")
    assert (got["engine_id"], got["url"], got["api_key"], got["status"]) == (
        engine_id, prov["url"], prov["api_key"], "running")
    assert got["engine_version"] == settings.engine_image
    assert got["last_health_at"] is not None

    r = await client.post("/engines/shape-user/admit", headers=pk(key))
    assert r.status_code == 200
    adm = r.json()
    assert set(adm) == {"admitted", "engine"}
    assert adm["admitted"] is True
    assert adm["engine"] == got | {"last_health_at": adm["engine"]["last_health_at"]}

    r = await client.get("/engines", headers=pk(key))
    assert r.status_code == 200
    listing = r.json()
    assert set(listing) == {"engines", "total"} and listing["total"] == 1
    (item,) = listing["engines"]
    assert_engine_object(item, "shape-user", with_key=False)
    assert item["engine_id"] == engine_id

    r = await client.post("/engines/shape-user/stop", headers=pk(key))
    assert r.status_code == 200
    assert r.json() == {"status": "stopped", "engine_id": engine_id}
    r = await client.post("/engines/shape-user/admit", json={"auto_provision": True, "auto_wake": True},
                          headers=pk(key))
    assert r.json() == {"admitted": False, "engine": None, "reason": "engine_stopped"}

    r = await client.post("/engines/shape-user/start", headers=pk(key))
    assert r.status_code == 200
    assert r.json() == {"status": "running", "url": prov["url"], "engine_id": engine_id}

    r = await client.post("/engines/shape-user/rotate-key", headers=pk(key))
    assert r.status_code == 200
    rot = r.json()
    assert set(rot) == {"engine_id", "user_id", "status", "url", "api_key"}
    assert (rot["engine_id"], rot["user_id"], rot["status"], rot["url"]) == (
        engine_id, "shape-user", "running", prov["url"])
    assert rot["api_key"].startswith("sk-sept-") and rot["api_key"] != prov["api_key"]
    assert (await client.get("/engines/shape-user", headers=pk(key))).json()["api_key"] == rot["api_key"]

    r = await client.delete("/engines/shape-user", headers=pk(key))
    assert r.status_code == 200
    assert r.json() == {"status": "destroyed", "engine_id": engine_id}
    assert not engine_dir(settings, engine_id).exists()
    port = int(prov["url"].rsplit(":", 1)[1])
    assert await pool_of(app).fetchval("SELECT count(*) FROM engines WHERE id = $1 OR port = $2", engine_id, port) == 0


async def test_admit_not_admitted_shape(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    for body in (None, {}, {"auto_provision": False}, {"auto_wake": True}):
        r = await client.post("/engines/nobody/admit", json=body, headers=pk(key))
        assert r.status_code == 200
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}
    # an empty body with any content type is allowed
    r = await client.post("/engines/nobody/admit", content=b"", headers=pk(key) | {"content-type": "text/plain"})
    assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}


async def test_status_and_metrics_shapes_for_an_empty_product(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    r = await client.get("/status", headers=pk(key))
    assert r.status_code == 200
    assert r.json() == {"total": 0, "by_status": dict.fromkeys(sorted(STATES), 0), "health": "ok",
                        "unhealthy_count": 0, "warm": 0}
    assert set(r.json()["by_status"]) == STATES
    r = await client.get("/metrics", headers=pk(key))
    assert r.status_code == 200
    assert r.json() == {"provisions_1h": 0, "crashes_1h": 0, "restarts_1h": 0, "avg_boot_ms": None,
                        "total_provisions": 0, "total_destroys": 0}
    r = await client.get("/engines", headers=pk(key))
    assert r.json() == {"engines": [], "total": 0}
