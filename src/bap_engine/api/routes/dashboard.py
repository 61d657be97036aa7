"""Operator views: the Prometheus endpoint and the ops dashboard (a static page calling the admin API).

The dashboard's HTML, JS and CSS live in `api/static/` (no build step). The page holds no secret:
it asks for the admin key once, keeps it in the browser's sessionStorage and sends it as
X-Admin-Key. A strict Content-Security-Policy allows only this origin's script, style and fetches.
"""

from __future__ import annotations

import functools
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response

from bap_engine.api.deps import BearerDep, FleetDep, ServicesDep
from bap_engine.api.errors import envelope
from bap_engine.api.metrics import CONTENT_TYPE, OpsMetrics
from bap_engine.errors import InvalidAdminKey, ServiceUnavailable

__all__ = ["router"]

router = APIRouter(tags=["ops"])

_ASSETS = {"dashboard.js": "text/javascript; charset=utf-8", "dashboard.css": "text/css; charset=utf-8"}
_SECURITY = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@functools.lru_cache(maxsize=8)
def _static(name: str) -> bytes:
    return resources.files("bap_engine.api").joinpath("static", name).read_bytes()


@router.get("/metrics/prometheus", response_class=Response,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text exposition format"}})
async def prometheus(request: Request, services: ServicesDep, fleet: FleetDep, bearer: BearerDep) -> Response:
    """Prometheus metrics. Needs `Authorization: Bearer <ORCH_ADMIN_KEY>` unless ORCH_METRICS_PUBLIC=true."""
    if not request.app.state.settings.metrics_public:
        if bearer is None:  # no Authorization header, or not the Bearer scheme
            raise InvalidAdminKey()
        fleet.check_admin(bearer.credentials.strip())
    metrics = getattr(request.app.state, "metrics", None)
    if not isinstance(metrics, OpsMetrics):
        raise ServiceUnavailable("metrics are not enabled in this app")
    body = await metrics.render(fleet, services.leadership, services.supervisor)
    return Response(body, media_type=CONTENT_TYPE, headers={"Cache-Control": "no-store"})


@router.get("/dashboard", response_class=HTMLResponse)
async def dashboard() -> HTMLResponse:
    """The ops dashboard page (asks for the admin key in the browser)."""
    return HTMLResponse(_static("dashboard.html"), headers=_SECURITY)


@router.get("/dashboard/{asset}", include_in_schema=False)
async def dashboard_asset(asset: str) -> Response:
    if asset not in _ASSETS:
        return envelope(404, "NOT_FOUND", "no such route")
    return Response(_static(asset), media_type=_ASSETS[asset], headers=_SECURITY)
