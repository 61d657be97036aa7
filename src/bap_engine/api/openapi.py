"""The OpenAPI document: FastAPI's, completed with each endpoint's response model and error codes.

Routes answer with hand-built JSON, so FastAPI alone would document most 200s as "any". This fills
them from `api/schemas.ENDPOINTS`, documents every error status with the envelope model and the
codes it can carry, and drops FastAPI's 422 (this API answers 400 VALIDATION_ERROR instead).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from bap_engine.api.models import ErrorOut
from bap_engine.api.schemas import COMMON_ERRORS, ENDPOINTS

__all__ = ["install_openapi", "build_openapi"]

_REF = "#/components/schemas/{model}"


def _model_refs(components: dict[str, Any]) -> dict[type[BaseModel], dict[str, str]]:
    models = sorted({m for m, _ in ENDPOINTS.values() if m is not None} | {ErrorOut}, key=lambda m: m.__name__)
    refs, top = models_json_schema([(m, "serialization") for m in models], ref_template=_REF)
    components.update(top.get("$defs", {}))
    return {model: dict(ref) for (model, _), ref in refs.items() if isinstance(model, type) and
            issubclass(model, BaseModel)}


def _error(codes: tuple[str, ...], ref: dict[str, str]) -> dict[str, Any]:
    return {"description": "error codes: " + ", ".join(codes), "content": {"application/json": {"schema": ref}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    refs = _model_refs(components)
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            responses: dict[str, Any] = op.setdefault("responses", {})
            responses.pop("422", None)
            known = ENDPOINTS.get((method, path))
            if known is None:  # not in the table: keep FastAPI's statuses, at least with the envelope model
                for status in [s for s in responses if s[:1] in ("4", "5")]:
                    responses[status] = {"description": "error envelope",
                                         "content": {"application/json": {"schema": refs[ErrorOut]}}}
                continue
            model, errors = known
            for status in [s for s in responses if s[:1] in ("4", "5")]:
                del responses[status]  # the table is the truth (routes declare a generic set)
            if model is not None:
                responses["200"] = {"description": model.__doc__.strip().splitlines()[0] if model.__doc__
                                    else "Successful response",
                                    "content": {"application/json": {"schema": refs[model]}}}
            for code, codes in sorted({**errors, **COMMON_ERRORS}.items()):
                responses[str(code)] = _error(codes, refs[ErrorOut])
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    return schema


def install_openapi(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
