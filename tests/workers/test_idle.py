"""Real sleep: idle engines are frozen (SIGSTOP), woken by admit, deep-slept after longer."""

from __future__ import annotations

from datetime import timedelta

import httpx

from bap_engine.config import Settings
from bap_engine.lifecycle import now
from bap_engine.workers.idle import IdleWorker
from tests.conftest import pk, register_product
from tests.workers.conftest import AppFactory, alive, engine_pid, lifecycle_of, process_state


async def _say(engine: dict[str, object], text: str) -> None:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.post(f"{engine['url']}/execute", json={"message": text},
                         headers={"X-Engine-Key": str(engine["api_key"])})
        assert r.status_code == 200


async def _history(engine: dict[str, object]) -> list[str]:
    async with httpx.AsyncClient(timeout=10) as c:
        r = await c.get(f"{engine['url']}/history", headers={"X-Engine-Key": str(engine["api_key"])})
        return [m["content"] for m in r.json()["messages"]]


async def test_idle_engine_sleeps_and_wakes(make_app: AppFactory, settings: Settings) -> None:
    async with make_app(idle_sleep_after_s=60, idle_stop_after_s=600) as (app, client):
        _, key = await register_product(client)
        r = await client.post("/engines/sleepy/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        await _say(engine, "remember me")
        await app.state.services.discovery.flush()
        lc = lifecycle_of(app)
        assert await IdleWorker(lc, app.state.settings).run_once() == 0  # not idle yet

        later = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(seconds=61))
        assert await later.run_once() == 1
        pid = engine_pid(settings, engine["engine_id"])
        assert process_state(pid) == "T"  # really frozen: no CPU
        r = await client.get("/engines/sleepy", headers=pk(key))
        assert r.json()["status"] == "sleeping"
        r = await client.post("/engines/sleepy/admit", headers=pk(key))
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_sleeping"}

        r = await client.post("/engines/sleepy/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["admitted"] is True and r.json()["engine"]["status"] == "running"
        assert process_state(pid) in ("S", "R")
        assert "remember me" in await _history(engine)

        # long idle: asleep, then stopped to free memory, still `sleeping`; wake starts it again
        await app.state.services.discovery.flush()
        assert await IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(seconds=61)).run_once() == 1
        deep = IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(seconds=700))
        assert await deep.run_once() == 1
        assert not alive(pid)
        assert (await client.get("/engines/sleepy", headers=pk(key))).json()["status"] == "sleeping"
        r = await client.post("/engines/sleepy/admit", json={"auto_wake": True}, headers=pk(key))
        assert r.json()["admitted"] is True
        assert "remember me" in await _history(engine)
        assert (await client.delete("/engines/sleepy", headers=pk(key))).status_code == 200


async def test_start_wakes_and_label_mode(make_app: AppFactory, settings: Settings) -> None:
    async with make_app(sleep_mode="label") as (app, client):
        _, key = await register_product(client)
        r = await client.post("/engines/lbl/admit", json={"auto_provision": True}, headers=pk(key))
        engine = r.json()["engine"]
        lc = lifecycle_of(app)
        assert await IdleWorker(lc, app.state.settings, clock=lambda: now() + timedelta(hours=1)).run_once() == 1
        assert process_state(engine_pid(settings, engine["engine_id"])) in ("S", "R")  # label only
        r = await client.post("/engines/lbl/start", headers=pk(key))
        assert r.status_code == 200 and r.json()["status"] == "running"
        assert (await client.delete("/engines/lbl", headers=pk(key))).status_code == 200
