"""The composition root: picks the backend, builds the services, starts the workers.

`create_app(settings)` is the FastAPI factory (uvicorn --factory passes nothing, so the
settings are then read from the environment). Nothing is built at import.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.responses import Response

from bap_engine import __version__
from bap_engine.api.bodylimit import BodyLimit
from bap_engine.api.deps import Services
from bap_engine.api.errors import envelope, install_error_handlers
from bap_engine.api.fastpath import AdmitFastPath
from bap_engine.api.metrics import MeteredDiscovery
from bap_engine.api.routes import admin, engines, fleet, health
from bap_engine.api.routes import events as events_routes
from bap_engine.api.routes import usage as usage_routes
from bap_engine.api.routes import webhooks as webhook_routes
from bap_engine.api.wiring import attach_metrics, install_ops
from bap_engine.backends.base import BackendError, EngineBackend
from bap_engine.config import Settings, ensure_secrets, load_settings
from bap_engine.db import migrate
from bap_engine.db.embedded import embedded_postgres
from bap_engine.db.pool import create_pool
from bap_engine.events import EventHub
from bap_engine.fleet import Fleet
from bap_engine.keys import KeySealer
from bap_engine.lifecycle import Lifecycle
from bap_engine.lifecycle.lifecycle import check_version
from bap_engine.lifecycle.owner import OwnerLock
from bap_engine.logs import register_secrets
from bap_engine.policy import RateLimiter
from bap_engine.supervisor import Supervisor
from bap_engine.webhooks import Webhooks
from bap_engine.workers.leader import run_workers
from bap_engine.workers.pool import PoolWorker
from bap_engine.workers.webhooks import WebhookWorker

__all__ = ["create_app", "build_services", "build_backend", "BackendFactory", "engine_env", "database",
           "register_product"]

log = logging.getLogger("bap_engine")
MAX_BODY = 64 * 1024


def build_backend(settings: Settings) -> EngineBackend:
    """The configured engine runtime (imports only the one in use)."""
    if settings.engine_backend == "docker":
        from bap_engine.backends.docker import DockerBackend, DockerConfig

        return DockerBackend(DockerConfig(deployment=settings.deployment, network=settings.engine_network,
                                          catalog_mount_path=settings.catalog_mount_path))
    if settings.engine_backend == "kubernetes":
        from bap_engine.backends.kubernetes import KubernetesBackend, KubernetesConfig

        return KubernetesBackend(KubernetesConfig(
            namespace=settings.k8s_namespace, storage_class=settings.k8s_storage_class,
            url_mode=settings.k8s_url_mode, deployment=settings.deployment, kubeconfig=settings.kubeconfig))
    from bap_engine.backends.subprocess import SubprocessBackend, SubprocessConfig

    return SubprocessBackend(SubprocessConfig(data_dir=settings.data_dir.resolve(), command=settings.engine_argv,
                                              deployment=settings.deployment, commands=settings.engine_versions))


def engine_env(settings: Settings) -> dict[str, str]:
    """Env every engine gets (besides its key hash): data path, catalog, passthrough."""
    env = {"SQLITE_DB_PATH": "/data/brain.sqlite"}
    if settings.catalog_mount_path:
        env["CATALOG_DIR"] = "/catalog"
    for name in settings.passthrough_names:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


async def _check_backend(backend: EngineBackend) -> None:
    try:
        await backend.ping()
    except BackendError as err:
        raise RuntimeError(f"engine backend {backend.name} unreachable: {err.message}") from None


@contextlib.asynccontextmanager
async def database(settings: Settings) -> AsyncIterator[str]:
    if settings.database_url:
        yield settings.database_url
    else:
        async with embedded_postgres(settings.data_dir) as dsn:
            yield dsn


BackendFactory = Callable[[Settings], EngineBackend]


@contextlib.asynccontextmanager
async def build_services(settings: Settings, backend_factory: BackendFactory | None = None) -> AsyncIterator[Services]:
    """Everything the API and the workers need, torn down in reverse order.

    `backend_factory` is the seam for tests and benches that run another backend."""
    async with contextlib.AsyncExitStack() as stack:
        supervisor = Supervisor()
        stack.push_async_callback(supervisor.aclose)  # runs after everything below is closed
        dsn = await stack.enter_async_context(database(settings))
        await migrate.upgrade(dsn)
        head = migrate.head_revision()
        pool = await create_pool(dsn)
        stack.push_async_callback(pool.close)
        owner = OwnerLock(dsn)
        owner_id = await owner.acquire()
        stack.push_async_callback(owner.release)
        supervisor.start("owner-lock", owner.keep)
        backend = (backend_factory or build_backend)(settings)
        stack.push_async_callback(backend.close)
        await _check_backend(backend)
        assert settings.master_key and settings.admin_key
        sealer = KeySealer(settings.master_key, settings.master_key_previous)  # opens under either, seals new
        lifecycle = Lifecycle(pool, backend, settings, sealer, owner_id, engine_env(settings))
        supervisor.start("op-expirer", lifecycle.tx.expire_dangling)
        limiter = RateLimiter(pool)
        stack.push_async_callback(limiter.release_all)
        discovery = MeteredDiscovery(pool, lifecycle, limiter)  # counts admits once metrics are attached

        async def ready() -> bool:
            try:
                async with pool.acquire(timeout=2) as conn:
                    return await migrate.is_current(conn, head)
            except Exception:  # whatever the database does, /health answers 503, never 500
                return False

        fleet = Fleet(pool, settings.admin_key, lifecycle.check_version)  # a policy pins only a known version
        services = Services(lifecycle, discovery, fleet, ready, supervisor, dsn)
        hub = EventHub(pool, dsn)  # one per process: GET /events and the webhook worker read it
        await hub.start()
        services.events = hub
        supervisor.start("events-listener", hub.run)

        async def _close_events() -> None:
            await supervisor.stop("events-listener", grace_s=0)  # it only ever ends by cancellation
            await hub.aclose()  # ends every open stream

        stack.push_async_callback(_close_events)
        services.workers.append(lambda: PoolWorker(lifecycle, settings))
        services.webhooks = webhooks = Webhooks(pool, sealer, settings.deployment)
        services.workers.append(lambda: WebhookWorker(webhooks, hub, supervisor))  # delivery, on the leader
        stop = asyncio.Event()
        supervisor.start("activity-flusher", lambda: discovery.run_flusher(settings.activity_flush_s, stop))

        async def _stop_flusher() -> None:
            stop.set()
            await supervisor.stop("activity-flusher")

        stack.push_async_callback(_stop_flusher)
        yield services


async def register_product(
    settings: Settings, slug: str, display_name: str, policy: dict[str, object]
) -> tuple[str, str]:
    """For the CLI: register directly in the database. Returns (product id, platform key). A pinned
    `policy.engine_version` is checked against the configured backend, as the API does."""
    assert settings.admin_key
    backend = build_backend(settings)

    async def known(version: str) -> None:
        await check_version(backend, version)

    try:
        async with database(settings) as dsn:
            await migrate.upgrade(dsn)
            pool = await create_pool(dsn, max_size=2)
            try:
                fleet = Fleet(pool, settings.admin_key, known)
                product, key = await fleet.register_product(slug, display_name, policy)
            finally:
                await pool.close()
    finally:
        await backend.close()
    return product.id, key


async def _db_down(request: Request, exc: Exception) -> Response:
    return envelope(503, "SERVICE_UNAVAILABLE", "database unavailable")


async def _timed_out(request: Request, exc: Exception) -> Response:
    # TimeoutError is an OSError, but nothing says the database is down: say what happened
    log.error("request timed out", exc_info=exc, extra={"path": request.url.path})
    return envelope(503, "SERVICE_UNAVAILABLE", "the request timed out; retry")


def create_app(settings: Settings | None = None, *, backend_factory: BackendFactory | None = None) -> FastAPI:
    settings = ensure_secrets(settings or load_settings())
    register_secrets(settings.admin_key, settings.master_key, settings.master_key_previous)  # scrubbed from logs

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        async with build_services(settings, backend_factory) as services:
            app.state.services = services
            attach_metrics(app, services)
            async with run_workers(services.dsn, services.lifecycle, settings, services.supervisor,
                                   services.workers) as leadership:
                services.leadership = leadership
                gc.collect()
                gc.freeze()  # start-up objects never die: keep them out of every later collection
                yield {}

    app = FastAPI(title="bap-engine", version=__version__, lifespan=lifespan, redirect_slashes=False,
                  description="Control plane that runs one AI-agent engine per user.")
    app.state.settings = settings
    install_error_handlers(app)
    # the database is down, refusing connections, or its socket is gone: 503, not 500
    for exc in (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError, asyncpg.TooManyConnectionsError,
                asyncpg.ObjectNotInPrerequisiteStateError, asyncpg.InvalidCatalogNameError, asyncpg.InterfaceError,
                asyncpg.InternalClientError,
                OSError):
        app.add_exception_handler(exc, _db_down)
    app.add_exception_handler(TimeoutError, _timed_out)  # more specific than OSError: found first
    app.add_middleware(AdmitFastPath)  # inside the body limit and the request log
    app.add_middleware(BodyLimit, max_body=MAX_BODY)
    for module in (health, engines, fleet, admin, usage_routes, events_routes, webhook_routes):
        app.include_router(module.router)
    install_ops(app)  # request log (outermost), Prometheus, admin ops and dashboard routes, OpenAPI
    return app
