"""The OpenAPI document states the real rules: patterns, bounds, enums, the two key headers as security
schemes applied per route, and every status each route answers, in the error envelope. The fuzz test
(tests/fuzz) checks the server against this document; this checks the document against the contract."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from bap_engine.api.models import SLUG_PATTERN, USER_ID_PATTERN
from bap_engine.api.params import MAX_QUERY_INT
from bap_engine.app import create_app
from bap_engine.config import Settings
from bap_engine.states import EngineState

PUBLIC = {("get", "/health"), ("get", "/dashboard")}


@pytest.fixture(scope="module")
async def doc() -> dict[str, Any]:
    # No lifespan: the document needs no database.
    app = create_app(Settings(database_url="postgresql://unused.invalid/db", master_key=Fernet.generate_key().decode(),
                              admin_key="adm-doc-test"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        document: dict[str, Any] = (await c.get("/openapi.json")).json()
    return document


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, ops in doc["paths"].items() for method, op in ops.items()]


def _param(op: dict[str, Any], name: str) -> dict[str, Any]:
    schema: dict[str, Any] = next(p for p in op["parameters"] if p["name"] == name)["schema"]
    return schema


def test_parameters_carry_their_rules(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    for method, path, op in _operations(doc):
        for param in op.get("parameters", []):
            schema = param["schema"]
            assert {"type": "null"} not in schema.get("anyOf", []), (method, path, param["name"])  # never sent
            assert param["name"].lower() not in ("x-platform-key", "x-admin-key", "authorization"), (method, path)
            if param["name"] == "user_id":
                assert schema["pattern"] == USER_ID_PATTERN, (method, path)
            if param["name"] == "product_id":
                assert schema["format"] == "uuid", (method, path)
    for path in ("/engines", "/products/{product_id}/engines"):
        op = doc["paths"][path]["get"]
        assert (_param(op, "limit")["minimum"], _param(op, "limit")["maximum"], _param(op, "limit")["default"]) == (
            1, 1000, 100)
        assert (_param(op, "offset")["minimum"], _param(op, "offset")["maximum"]) == (0, MAX_QUERY_INT)
        assert MAX_QUERY_INT < 2**63
        status = schemas[_param(op, "status")["$ref"].rsplit("/", 1)[1]]
        assert status["enum"] == [str(s) for s in EngineState]
    for path in ("/audit", "/products/{product_id}/audit"):
        op = doc["paths"][path]["get"]
        assert (_param(op, "after_id")["minimum"], _param(op, "after_id")["maximum"]) == (0, MAX_QUERY_INT)
        assert (_param(op, "limit")["minimum"], _param(op, "limit")["maximum"]) == (1, 1000)
    assert _param(doc["paths"]["/audit"]["get"], "product_id")["format"] == "uuid"
    assert schemas["RegisterBody"]["properties"]["slug"]["pattern"] == SLUG_PATTERN
    assert schemas["ProvisionBody"]["properties"]["user_id"]["pattern"] == USER_ID_PATTERN
    policy = schemas["RegisterBody"]["properties"]["policy"]
    assert policy["additionalProperties"] is False and set(policy["properties"]) == {
        "max_engines", "rate_limit_rpm", "engine_version", "warm_pool"}
    assert policy["properties"]["max_engines"]["anyOf"][0] == {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}


def test_keys_are_security_schemes_applied_per_route(doc: dict[str, Any]) -> None:
    assert doc["components"]["securitySchemes"] == {
        "PlatformKey": {"type": "apiKey", "in": "header", "name": "X-Platform-Key",
                        "description": doc["components"]["securitySchemes"]["PlatformKey"]["description"]},
        "AdminKey": {"type": "apiKey", "in": "header", "name": "X-Admin-Key",
                     "description": doc["components"]["securitySchemes"]["AdminKey"]["description"]},
        "AdminBearer": {"type": "http", "scheme": "bearer",
                        "description": doc["components"]["securitySchemes"]["AdminBearer"]["description"]},
    }
    for method, path, op in _operations(doc):
        if (method, path) in PUBLIC:
            assert "security" not in op, (method, path)
            continue
        schemes = {name for requirement in op["security"] for name in requirement}
        expected = ({"PlatformKey"} if path.startswith(("/engines", "/status")) or path in (
                        "/metrics", "/usage", "/events")
                    else {"AdminKey", "PlatformKey"} if path == "/audit"
                    else {"AdminBearer"} if path == "/metrics/prometheus" else {"AdminKey"})
        assert schemes == expected, (method, path, schemes)
        for key_error in ({"INVALID_PLATFORM_KEY"} if "PlatformKey" in expected else set()) | (
                {"INVALID_ADMIN_KEY"} if expected - {"PlatformKey"} else set()):
            assert key_error in op["responses"]["401"]["description"], (method, path)
        assert "SERVICE_UNAVAILABLE" in op["responses"]["503"]["description"], (method, path)  # database down


def test_every_status_is_documented_in_the_envelope(doc: dict[str, Any]) -> None:
    for method, path, op in _operations(doc):
        responses = op["responses"]
        assert "422" not in responses and "500" in responses, (method, path)
        for status, response in responses.items():
            if status[0] in "45":
                assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut"), (path, status)
        if "requestBody" in op:
            assert {"400", "413"} <= set(responses), (method, path)
    for path in ("/engines/provision", "/engines/{user_id}/admit"):
        assert "QUOTA_EXCEEDED" in doc["paths"][path]["post"]["responses"]["429"]["description"]
    admit_429 = doc["paths"]["/engines/{user_id}/admit"]["post"]["responses"]["429"]
    assert admit_429["headers"]["Retry-After"]["schema"] == {"type": "integer", "minimum": 1, "maximum": 60}


def test_a_concrete_path_documents_what_a_template_serves_there(doc: dict[str, Any]) -> None:
    # GET/DELETE/PATCH /engines/provision are the user named `provision` (the same on /engines/{user_id})
    provision = doc["paths"]["/engines/provision"]
    assert set(provision) == {"post", "get", "delete", "patch"}
    assert provision["get"]["responses"] == doc["paths"]["/engines/{user_id}"]["get"]["responses"]
    assert all(p["in"] != "path" for p in provision["get"].get("parameters", []))
    ids = [op["operationId"] for _, _, op in _operations(doc)]
    assert len(ids) == len(set(ids))
