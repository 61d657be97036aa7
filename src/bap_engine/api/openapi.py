"""The OpenAPI document: FastAPI's, completed with each endpoint's response model and error codes.

Routes answer with hand-built JSON, so FastAPI alone would document most 200s as "any". This fills
them from `api/schemas.ENDPOINTS`, documents every error status with the envelope model and the
codes it can carry (and Retry-After on RATE_LIMITED), and drops FastAPI's 422 (this API answers 400
VALIDATION_ERROR instead). Parameters, bounds, patterns and the securitySchemes come from the routes
themselves (`api/params.py`, `api/deps.py`); here an optional parameter loses FastAPI's `null` branch
(a query string cannot carry a JSON null: absent means none), integer bounds are integers again, and a
concrete path also documents the methods a templated route serves on it (`GET /engines/provision` is
the user named `provision`), so the document says exactly what the server answers.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import iter_route_contexts
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.routing import BaseRoute, Match

from bap_engine.api.models import ErrorOut
from bap_engine.api.schemas import COMMON_ERRORS, ENDPOINTS, Errors

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


_BOUNDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
_RETRY_AFTER = {"Retry-After": {"description": "whole seconds to wait (RATE_LIMITED only)",
                                 "schema": {"type": "integer", "minimum": 1, "maximum": 60}}}


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    branches = schema.get("anyOf")
    if not isinstance(branches, list) or {"type": "null"} not in branches:
        return schema
    rest = [b for b in branches if b != {"type": "null"}]
    out = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    return {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **out}


def _complete(op: dict[str, Any], known: tuple[type[BaseModel] | None, Errors] | None,
              refs: dict[type[BaseModel], dict[str, str]]) -> None:
    for param in op.get("parameters", []):
        param["schema"] = _without_null(param.get("schema", {}))
    responses: dict[str, Any] = op.setdefault("responses", {})
    responses.pop("422", None)
    if known is None:  # not in the table: keep FastAPI's statuses, at least with the envelope model
        for status in [s for s in responses if s[:1] in ("4", "5")]:
            responses[status] = {"description": "error envelope",
                                 "content": {"application/json": {"schema": refs[ErrorOut]}}}
        return
    model, errors = known
    for status in [s for s in responses if s[:1] in ("4", "5")]:
        del responses[status]  # the table is the truth (routes declare a generic set)
    if model is not None:
        responses["200"] = {"description": model.__doc__.strip().splitlines()[0] if model.__doc__
                            else "Successful response",
                            "content": {"application/json": {"schema": refs[model]}}}
    for code, codes in sorted({**errors, **COMMON_ERRORS}.items()):
        responses[str(code)] = _error(codes, refs[ErrorOut])
        if "RATE_LIMITED" in codes:
            responses[str(code)]["headers"] = _RETRY_AFTER


def _integral_bounds(node: object) -> None:
    """FastAPI's OpenAPI model stores bounds as floats (`"maximum": 1000.0`); an integer's bounds are
    integers again here, so that clients and fuzzers derive `1000`, not `1000.0`, from them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _BOUNDS and isinstance(value, float) and value.is_integer():
                node[key] = int(value)
            else:
                _integral_bounds(value)
    elif isinstance(node, list):
        for item in node:
            _integral_bounds(item)


def _served_params(route: Any, path: str, method: str, op: dict[str, Any]) -> dict[str, str] | None:
    """The path parameters `route` reads from the concrete `path` when it serves it (each one valid
    for its pattern), else None."""
    match, child = route.matches({"type": "http", "path": path, "root_path": "", "method": method})
    values: dict[str, str] = child.get("path_params", {}) if match is Match.FULL else {}
    for param in (p for p in op.get("parameters", []) if p["in"] == "path"):
        if param["name"] not in values or not re.fullmatch(param["schema"].get("pattern", ".*"), values[param["name"]]):
            return None
    return values or None


def _alias(op: dict[str, Any], method: str, template: str, concrete: str, values: dict[str, str]) -> dict[str, Any]:
    alias = copy.deepcopy(op)
    alias["parameters"] = [p for p in op.get("parameters", []) if p["in"] != "path"]
    alias["operationId"] = f"{op.get('operationId', method.lower())}_at{concrete.replace('/', '_')}"
    named = ", ".join(f"{k} = `{v}`" for k, v in values.items())
    alias["description"] = f"{method} {template} with {named}. {op.get('description', '')}".strip()
    return alias


def _shadowed(paths: dict[str, Any], routes: Sequence[BaseRoute]) -> None:
    """Document what a templated route serves on a concrete path: OpenAPI matches `/engines/provision`
    before `/engines/{user_id}`, yet GET and DELETE there act on the user named `provision`."""
    for concrete in [p for p in paths if "{" not in p]:
        for route in iter_route_contexts(routes):
            template = route.path or ""
            if template == concrete or template not in paths:
                continue
            for method in sorted(route.methods or ()):
                op = paths[template].get(method.lower())
                if op is None or method.lower() in paths[concrete]:
                    continue
                values = _served_params(route, concrete, method, op)
                if values is not None:
                    paths[concrete][method.lower()] = _alias(op, method, template, concrete, values)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    _integral_bounds(schema)
    components: dict[str, Any] = schema.setdefault("components", {}).setdefault("schemas", {})
    refs = _model_refs(components)
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            _complete(op, ENDPOINTS.get((method, path)), refs)
    _shadowed(schema.get("paths", {}), app.routes)
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
