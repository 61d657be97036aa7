"""The lifecycle through the API, the same test bodies on every backend present.

subprocess always runs; docker and kubernetes skip unless their runtime is up (or fail
under BAP_REQUIRE_DOCKER / BAP_REQUIRE_K8S / BAP_REQUIRE_BACKENDS). Engines are reached
at the URL the orchestrator hands out, as a product would.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from asgi_lifespan import LifespanManager

from bap_engine.app import create_app
from bap_engine.backends.base import LABEL_DEPLOYMENT, LABEL_ENGINE_ID, LABEL_PRODUCT_ID, EngineSpec, Placement
from bap_engine.config import Settings
from bap_engine.lifecycle import Lifecycle, ObservedState, now
from bap_engine.workers.health import HealthWorker
from bap_engine.workers.idle import IdleWorker
from bap_engine.workers.reconcile import ReconcileWorker
from tests.backends.helpers import DEFAULT_IMAGE
from tests.conftest import pk, register_product, wait_until


def _overrides(name: str) -> dict[str, Any]:
    if name == "docker":
        return {"engine_backend": "docker", "engine_image": DEFAULT_IMAGE}
    if name == "kubernetes":
        from tests.backends.support_kubernetes import NAMESPACE, kubeconfig_path

        return {"engine_backend": "kubernetes", "engine_image": DEFAULT_IMAGE, "k8s_namespace": NAMESPACE,
                "kubeconfig": str(kubeconfig_path()), "k8s_url_mode": "hostport", "boot_timeout_s": 120}
    return {}


@contextlib.asynccontextmanager
async def running_app(name: str, settings: Settings, tmp_path: Path) -> AsyncIterator[tuple[Any, Any, Any]]:
    """(app, client, support module) for backend `name`; skips when the runtime is absent."""
    support = importlib.import_module(f"tests.backends.support_{name}")
    async with support.make_backend(tmp_path / "support", settings.deployment):  # skip + cleanup by label
        application = create_app(settings.model_copy(update=_overrides(name)))
        async with LifespanManager(application, startup_timeout=120, shutdown_timeout=60):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=180) as client:
                yield application, client, support


def _lc(app: Any) -> Lifecycle:
    lc: Lifecycle = app.state.services.lifecycle
    return lc


async def _row(lc: Lifecycle, engine_id: str) -> Any:
    from bap_engine.registry import get_engine_by_id

    async with lc.pool.acquire() as conn:
        return await get_engine_by_id(conn, engine_id)


async def _engine_call(engine: dict[str, Any], message: str | None = None) -> list[str]:
    """Say something (when given) and return the engine's stored message contents."""
    headers = {"X-Engine-Key": engine["api_key"]}
    async with httpx.AsyncClient(timeout=30) as c:
        if message is not None:
            async with c.stream("POST", f"{engine['url']}/execute", json={"message": message}, headers=headers) as r:
                assert r.status_code == 200
                body = (await r.aread()).decode()
            assert "event: done" in body
        r = await c.get(f"{engine['url']}/history", headers=headers)
        assert r.status_code == 200, r.text
        return [m["content"] for m in r.json()["messages"]]


async def _heal(app: Any, engine_id: str, dsn: str) -> None:
    worker = HealthWorker(_lc(app), app.state.settings)

    async def healed() -> bool:
        await worker.run_once()
        await worker.wait_restarts()
        conn = await asyncpg.connect(dsn)
        try:
            n = await conn.fetchval("SELECT count(*) FROM audit_log WHERE engine_id = $1 "
                                    "AND action = 'auto_restart_success'", engine_id)
        finally:
            await conn.close()
        return bool(n)

    await wait_until(healed, timeout=180, interval=0.2)


@pytest.mark.parametrize("backend_name", ["subprocess", "docker", "kubernetes"])
async def test_engine_lifecycle(backend_name: str, settings: Settings, tmp_path: Path, pg_dsn: str) -> None:
    tuned = settings.model_copy(update={"health_max_failures": 1, "restart_backoff_base_s": 0.05,
                                        "key_rotation_overlap_s": 1})
    async with running_app(backend_name, tuned, tmp_path) as (app, client, support):
        lc = _lc(app)
        _, key = await register_product(client)
        r = await client.post("/engines/ann/admit", json={"auto_provision": True}, headers=pk(key))
        assert r.status_code == 200 and r.json()["admitted"], r.text
        engine = r.json()["engine"]
        assert "hello" in " ".join(await _engine_call(engine, "hello world"))

        r = await client.post("/engines/ann/rotate-key", headers=pk(key))
        assert r.status_code == 200, r.text
        engine = {**engine, "api_key": r.json()["api_key"]}
        assert await _engine_call(engine)

        assert (await client.post("/engines/ann/stop", headers=pk(key))).json()["status"] == "stopped"
        assert (await client.post("/engines/ann/admit", headers=pk(key))).json()["reason"] == "engine_stopped"
        assert (await client.post("/engines/ann/start", headers=pk(key))).status_code == 200
        assert "hello world" in await _engine_call(engine)  # data kept across stop/start

        await app.state.services.discovery.flush()
        idle = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(hours=1))
        assert await idle.run_once() == 1
        if app.state.settings.sleep_mode == "pause":
            assert (await lc.backend.inspect(engine["engine_id"])).state == ObservedState.PAUSED
        r = await client.post("/engines/ann/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["admitted"] is True, r.text
        assert "hello world" in await _engine_call(engine)  # data kept across sleep/wake

        row = await _row(lc, engine["engine_id"])
        await support.kill_behind_back(lc.backend, Placement(row.id, row.url, row.ref or ""))
        await _heal(app, engine["engine_id"], pg_dsn)
        assert "hello world" in await _engine_call(engine)

        r = await client.delete("/engines/ann", headers=pk(key))
        assert r.status_code == 200
        assert (await lc.backend.inspect(engine["engine_id"])).state == ObservedState.ABSENT
        assert engine["engine_id"] not in {o.engine_id for o in await lc.backend.list_managed()}


@pytest.mark.parametrize("backend_name", ["subprocess", "docker"])
async def test_engine_removed_behind_our_back(backend_name: str, settings: Settings, tmp_path: Path,
                                              pg_dsn: str) -> None:
    tuned = settings.model_copy(update={"health_max_failures": 1, "restart_backoff_base_s": 0.05})
    async with running_app(backend_name, tuned, tmp_path) as (app, client, _):
        lc = _lc(app)
        _, key = await register_product(client)
        engine = (await client.post("/engines/gone/admit", json={"auto_provision": True}, headers=pk(key))).json()
        engine_id = engine["engine"]["engine_id"]
        row = await _row(lc, engine_id)
        if backend_name == "docker":
            import docker

            docker.from_env().containers.get(f"bap-engine-{engine_id}").remove(force=True)
        else:
            os.kill(int(row.ref), signal.SIGKILL)
            (settings.data_dir / "engines" / engine_id / ".bap-process.json").unlink()
        await wait_until(lambda: _absent(lc, engine_id), timeout=30)
        await _heal(app, engine_id, pg_dsn)
        assert (await client.get("/engines/gone", headers=pk(key))).json()["status"] == "running"
        assert (await client.delete("/engines/gone", headers=pk(key))).status_code == 200


async def _absent(lc: Lifecycle, engine_id: str) -> bool:
    return (await lc.backend.inspect(engine_id)).state in (ObservedState.ABSENT, ObservedState.EXITED)


@pytest.mark.parametrize("backend_name", ["subprocess", "docker", "kubernetes"])
async def test_labelled_engine_without_row_is_removed(backend_name: str, settings: Settings, tmp_path: Path) -> None:
    async with running_app(backend_name, settings, tmp_path) as (app, _, __):
        lc = _lc(app)
        import uuid

        orphan = str(uuid.uuid4())
        labels = {LABEL_ENGINE_ID: orphan, LABEL_PRODUCT_ID: str(uuid.uuid4()), LABEL_DEPLOYMENT: settings.deployment}
        await lc.backend.create(EngineSpec(engine_id=orphan, product_id=labels[LABEL_PRODUCT_ID],
                                           port=settings.port_max, image=DEFAULT_IMAGE,
                                           env={"ENGINE_API_KEY": "sk-sept-orphan"}, labels=labels))
        assert await ReconcileWorker(lc, app.state.settings).run_once() == 0  # young: maybe a provision
        later = ReconcileWorker(lc, app.state.settings, clock=lambda: now() + timedelta(seconds=900))
        assert await later.run_once() == 1
        assert (await lc.backend.inspect(orphan)).state == ObservedState.ABSENT


@pytest.mark.parametrize("backend_name", ["subprocess", "docker", "kubernetes"])
async def test_warm_pool_claim(backend_name: str, settings: Settings, tmp_path: Path) -> None:
    """A pool engine booted by the worker is handed to a new user with the user's own key, the
    pool key refused at once, its data the user's; emptying the pool destroys the rest."""
    from bap_engine.workers.pool import PoolWorker

    async with running_app(backend_name, settings, tmp_path) as (app, client, support):
        lc = _lc(app)
        product_id, key = await register_product(client, {"warm_pool": 1})
        worker = PoolWorker(lc, app.state.settings)
        assert await worker.run_once() == 1
        assert (await client.get("/status", headers=pk(key))).json()["warm"] == 1
        async with lc.pool.acquire() as conn:
            pool_id = await conn.fetchval("SELECT id::text FROM engines WHERE product_id = $1 AND pool", product_id)
        pool_key = lc.key_of(await _row(lc, pool_id))
        r = await client.post("/engines/warm-user/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        assert engine["engine_id"] == pool_id and engine["user_id"] == "warm-user"
        assert await _engine_call(engine, "hello") == ["hello", "echo: hello"]
        async with httpx.AsyncClient(timeout=30) as c:
            stale = await c.get(f"{engine['url']}/history", headers={"X-Engine-Key": pool_key})
        assert stale.status_code == 401
        assert await worker.run_once() == 1  # refilled
        r = await client.put(f"/products/{product_id}/policy", json={"policy": {}},
                             headers={"X-Admin-Key": str(settings.admin_key)})
        assert r.status_code == 200
        assert await worker.run_once() == 1  # the new pool engine destroyed
        async with lc.pool.acquire() as conn:
            assert await conn.fetchval("SELECT count(*) FROM engines WHERE product_id = $1 AND pool", product_id) == 0
        assert (await client.delete("/engines/warm-user", headers=pk(key))).status_code == 200


@pytest.mark.parametrize("backend_name", ["subprocess", "docker", "kubernetes"])
async def test_busy_engine_is_not_put_to_sleep(backend_name: str, settings: Settings, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """An engine streaming /execute says busy in /health: the idle worker (its clock far past the idle
    limit) leaves it running until the stream ends, then puts it to sleep."""
    monkeypatch.setenv("REFENGINE_DELTA_DELAY_MS", "200")
    slow = settings.model_copy(update={"engine_env_passthrough": "REFENGINE_DELTA_DELAY_MS"})
    async with running_app(backend_name, slow, tmp_path) as (app, client, support):
        lc = _lc(app)
        _, key = await register_product(client)
        r = await client.post("/engines/busy-user/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        later = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(hours=2))
        words = " ".join(f"w{i}" for i in range(10))  # ~2 s of deltas
        async with httpx.AsyncClient(timeout=60) as c, c.stream(
                "POST", f"{engine['url']}/execute", json={"message": words},
                headers={"X-Engine-Key": engine["api_key"]}) as stream:
            chunks = stream.aiter_text()
            assert "thread_lifecycle" in await anext(chunks)  # in flight
            assert await later.run_once() == 0  # busy: spared, though idle for "2 hours"
            assert (await _row(lc, engine["engine_id"])).status == "running"
            body = "".join([chunk async for chunk in chunks])
        assert "event: done" in body
        assert await later.run_once() == 0  # its last probe said busy
        await HealthWorker(lc, app.state.settings).run_once()  # the next probe says it is not
        assert await later.run_once() == 1  # now it sleeps
        assert (await _row(lc, engine["engine_id"])).status == "sleeping"
        assert (await client.delete("/engines/busy-user", headers=pk(key))).status_code == 200
