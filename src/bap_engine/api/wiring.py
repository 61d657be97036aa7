"""Wires the operator features into an app: Prometheus registry, request log, HEAD on every GET
route, admin and dashboard routes, and the completed OpenAPI document. Called once by `create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from bap_engine.api.deps import Services
from bap_engine.api.methods import HeadAsGet
from bap_engine.api.metrics import MeteredDiscovery, OpsMetrics
from bap_engine.api.openapi import install_openapi
from bap_engine.api.requestlog import RequestLog
from bap_engine.api.routes import dashboard, operator

__all__ = ["install_ops", "attach_metrics"]


def install_ops(app: FastAPI) -> None:
    """Call after the other middleware, so the request log is outermost (it sees 413s too and logs
    HEAD as HEAD), and HEAD is a GET before the body limit and the admit fast path see it."""
    app.state.metrics = OpsMetrics()
    app.add_middleware(HeadAsGet)
    app.add_middleware(RequestLog)
    app.include_router(operator.router)
    app.include_router(dashboard.router)
    install_openapi(app)


def attach_metrics(app: FastAPI, services: Services) -> None:
    """Let a MeteredDiscovery report admissions to the app's registry (in the lifespan)."""
    if isinstance(services.discovery, MeteredDiscovery) and isinstance(app.state.metrics, OpsMetrics):
        services.discovery.metrics = app.state.metrics
