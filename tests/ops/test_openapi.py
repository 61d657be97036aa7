"""/openapi.json documents every endpoint with its response model and error codes; /docs is served."""

from __future__ import annotations

import httpx
from cryptography.fernet import Fernet
from fastapi.routing import APIRoute, iter_route_contexts  # included routers are wrapped in app.routes

from bap_engine.app import create_app
from bap_engine.config import Settings


async def test_openapi_describes_every_endpoint(tmp_path: object) -> None:
    # No lifespan: the document needs no database.
    app = create_app(Settings(database_url="postgresql://unused.invalid/db", master_key=Fernet.generate_key().decode(),
                              admin_key="adm-doc-test"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        doc = (await c.get("/openapi.json")).json()
        docs = await c.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()

    flat = [ctx.original_route for ctx in iter_route_contexts(app.routes)]
    routes = [(m.lower(), r.path) for r in flat if isinstance(r, APIRoute) and r.include_in_schema
              for m in r.methods or ()]
    assert len(routes) >= 25
    schemas = doc["components"]["schemas"]
    for method, path in routes:
        op = doc["paths"][path][method]
        responses = op["responses"]
        assert "422" not in responses, (method, path)
        ok = responses["200"]["content"]
        if "application/json" in ok:
            ref = ok["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
            assert schemas[ref]["properties"], (method, path)
        else:
            assert set(ok) & {"text/html", "text/plain", "text/event-stream"}, (method, path)
        errors = {s: r for s, r in responses.items() if s[0] in "45"}
        assert "500" in errors, (method, path)
        for status, response in errors.items():
            assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorOut"), (method, path)
            assert response["description"].startswith("error codes: "), (method, path, status)
        if "requestBody" in op:
            assert "400" in errors and "VALIDATION_ERROR" in errors["400"]["description"], (method, path)

    admit = doc["paths"]["/engines/{user_id}/admit"]["post"]["responses"]
    assert "RATE_LIMITED" in admit["429"]["description"]
    provision = doc["paths"]["/engines/provision"]["post"]
    assert provision["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProvisionBody")
    assert set(schemas["ProvisionOut"]["required"]) == {"engine_id", "user_id", "status", "url", "api_key"}
    assert "PRODUCT_NOT_FOUND" in doc["paths"]["/products/{product_id}/engines"]["get"]["responses"]["404"][
        "description"]
