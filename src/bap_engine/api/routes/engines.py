"""Engine lifecycle, discovery and admission routes (X-Platform-Key)."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from pydantic import ValidationError

from bap_engine.api.deps import DiscoveryDep, LifecycleDep, PlatformKeyDep, ProductDep, UserIdDep, check_user_id
from bap_engine.api.models import (
    AdmitBody,
    AdmitOut,
    EngineOut,
    EngineSettingsBody,
    ErrorOut,
    ProvisionBody,
    UpgradeBody,
    iso,
)
from bap_engine.api.responses import JSON
from bap_engine.discovery import Discovery
from bap_engine.errors import InvalidPlatformKey, ValidationFailed
from bap_engine.lifecycle import EngineView, set_idle_sleep
from bap_engine.policy import parse_policy

__all__ = ["router", "engine_json", "admit_response"]

router = APIRouter(tags=["engines"])

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut} for code in (400, 401, 404, 409, 429, 502, 503, 504)
}


def engine_json(v: EngineView, *, with_key: bool = True) -> dict[str, object]:
    out: dict[str, object] = {"engine_id": v.engine_id, "user_id": v.user_id, "status": v.status, "url": v.url}
    if with_key:
        out["api_key"] = v.api_key
    out.update(engine_version=v.engine_version, created_at=iso(v.created_at), last_health_at=iso(v.last_health_at),
               idle_sleep=v.idle_sleep)
    return out


@router.post("/engines/provision", responses=_ERRORS)
async def provision(body: ProvisionBody, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """Provision the user's engine and wait until it is healthy."""
    check_user_id(body.user_id)
    policy = parse_policy(product.policy)
    row, key = await lifecycle.provision(product, body.user_id, body.engine_version or policy.engine_version,
                                         actor=product.slug, max_engines=policy.max_engines)
    return JSON({"engine_id": row.id, "user_id": row.user_id, "status": "running", "url": row.url,
                           "api_key": key})


@router.delete("/engines/{user_id}", responses=_ERRORS)
async def destroy(user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """Remove the engine, its data volume, its port and its row."""
    engine_id = await lifecycle.destroy(product, user_id, actor=product.slug)
    return JSON({"status": "destroyed", "engine_id": engine_id})


@router.post("/engines/{user_id}/start", responses=_ERRORS)
async def start(user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """Start a stopped, sleeping or failed engine and wait until healthy."""
    row = await lifecycle.start(product, user_id, actor=product.slug)
    return JSON({"status": "running", "url": row.url, "engine_id": row.id})


@router.post("/engines/{user_id}/stop", responses=_ERRORS)
async def stop(user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """SIGTERM, grace, SIGKILL; data kept."""
    row = await lifecycle.stop(product, user_id, actor=product.slug)
    return JSON({"status": "stopped", "engine_id": row.id})


@router.post("/engines/{user_id}/rotate-key", responses=_ERRORS)
async def rotate_key(user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """Give the running engine a new key (the old one works for the overlap window)."""
    row, key = await lifecycle.rotate_key(product, user_id, actor=product.slug)
    return JSON({"engine_id": row.id, "user_id": row.user_id, "status": str(row.status),
                           "url": row.url, "api_key": key})


@router.post("/engines/{user_id}/upgrade", responses=_ERRORS)
async def upgrade(body: UpgradeBody, user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """Run the engine on another version, keeping its data, key, URL and id; waits until healthy, else
    puts it back on its previous version (`outcome: "rolled_back"`). A stopped or sleeping engine stays so."""
    row, outcome = await lifecycle.upgrade(product, user_id, body.engine_version, actor=product.slug)
    return JSON({"engine_id": row.id, "user_id": row.user_id, "status": str(row.status), "url": row.url,
                 "engine_version": row.engine_version, "outcome": outcome})


@router.get("/engines/{user_id}", response_model=EngineOut, responses=_ERRORS)
async def get_engine(user_id: UserIdDep, product: ProductDep, lifecycle: LifecycleDep) -> JSON:
    """The user's engine with its key; never provisions."""
    return JSON(engine_json(await lifecycle.engine_view(product, user_id)))


@router.patch("/engines/{user_id}", response_model=EngineOut, responses=_ERRORS)
async def update_settings(body: EngineSettingsBody, user_id: UserIdDep, product: ProductDep,
                          lifecycle: LifecycleDep) -> JSON:
    """Change the engine's settings (`idle_sleep`); answers as GET. No state change and no backend
    call, so it works during another operation too; audited `settings_update` when a value changes."""
    view = await set_idle_sleep(lifecycle, product, user_id, body.idle_sleep, actor=product.slug)
    return JSON(engine_json(view))


_ADMIT_BODY = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": AdmitBody.model_json_schema()}}}}


def _admit_options(raw: bytes) -> AdmitBody:
    """Parse the admit body by hand: empty is allowed, any content type is read as JSON."""
    if not raw.strip():
        return AdmitBody()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ValidationFailed("request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ValidationFailed("request body must be a JSON object")
    try:
        return AdmitBody.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        raise ValidationFailed(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None


@router.post("/engines/{user_id}/admit", response_model=AdmitOut, responses=_ERRORS, openapi_extra=_ADMIT_BODY)
async def admit(request: Request, user_id: UserIdDep, discovery: DiscoveryDep, platform_key: PlatformKeyDep) -> JSON:
    """Rate limit → lookup → auto-provision or auto-wake → answer.

    Served by api/fastpath.py in the running app (same code, without routing and dependency
    solving); this route documents it and serves it wherever the fast path is not installed."""
    return await admit_response(discovery, platform_key, user_id, await request.body())


async def admit_response(discovery: Discovery, platform_key: str | None, user_id: str, body: bytes) -> JSON:
    """The admit answer. Raises InvalidPlatformKey, ValidationFailed and admit's errors."""
    if not platform_key:
        raise InvalidPlatformKey()
    opts = _admit_options(body)
    result = await discovery.admit(platform_key, user_id, auto_provision=opts.auto_provision,
                                   auto_wake=opts.auto_wake)
    if result.admitted and result.engine is not None:
        return JSON({"admitted": True, "engine": engine_json(result.engine)})
    return JSON({"admitted": False, "engine": None, "reason": result.reason})
