"""End to end through the API with real engine processes: register → admit → execute → rotate →
stop → start → destroy, the audit trail it leaves, and an orchestrator restart under running engines."""

from __future__ import annotations

import json

import httpx

from bap_engine.config import Settings
from tests.conftest import (
    ADMIN_KEY,
    ResponseLog,
    assert_envelope,
    engine_dir,
    open_app,
    pk,
    pool_of,
    register_product,
    unique_slug,
    wait_until,
)


def parse_sse(text: str) -> list[tuple[str, dict[str, object]]]:
    events = []
    for block in text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            events.append((name[len("event: "):], json.loads(data[len("data: "):])))
    return events


async def execute(url: str, key: str, message: str, thread_id: str) -> list[tuple[str, dict[str, object]]]:
    async with httpx.AsyncClient(base_url=url, timeout=10) as engine, engine.stream(
        "POST", "/execute", json={"message": message, "thread_id": thread_id}, headers={"X-Engine-Key": key}
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        text = "".join([part async for part in r.aiter_text()])
    return parse_sse(text)


async def history(url: str, key: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=10) as engine:
        return await engine.get("/history", headers={"X-Engine-Key": key})


async def unreachable(url: str) -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as engine:
            await engine.get("/health")
    except httpx.TransportError:
        return True
    return False


async def test_walkthrough(settings: Settings, response_log: ResponseLog) -> None:
    fast_rotation = settings.model_copy(update={"key_rotation_overlap_s": 1})
    async with open_app(fast_rotation, response_log) as (app, client):
        slug = unique_slug()
        r = await client.post("/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                              json={"slug": slug, "display_name": "Walk", "policy": {"max_engines": 5}})
        product_id, key = r.json()["product_id"], r.json()["platform_api_key"]
        r = await client.put(f"/products/{product_id}/policy", headers={"X-Admin-Key": ADMIN_KEY},
                             json={"policy": {"max_engines": 2}})
        assert r.status_code == 200

        # admit with auto_provision creates, boots and returns the engine
        r = await client.post("/engines/walker/admit", json={"auto_provision": True}, headers=pk(key))
        assert r.status_code == 200, r.text
        admitted = r.json()
        assert admitted["admitted"] is True
        engine = admitted["engine"]
        engine_id, url, key1 = engine["engine_id"], engine["url"], engine["api_key"]
        assert engine["status"] == "running"
        assert engine_dir(settings, engine_id).is_dir()

        # the engine answers with the returned key: SSE events, then the history
        events = await execute(url, key1, "hello big world", "t1")
        assert [name for name, _ in events] == ["thread_lifecycle", "text_delta", "text_delta", "text_delta",
                                                "text_delta", "done"]
        assert events[0][1] == {"thread_id": "t1", "state": "started"}
        assert "".join(str(d["delta"]) for n, d in events if n == "text_delta") == "echo: hello big world"
        r = await history(url, key1)
        assert r.status_code == 200
        messages = r.json()["messages"]
        assert [(m["role"], m["content"]) for m in messages] == [("user", "hello big world"),
                                                                ("assistant", "echo: hello big world")]
        assert events[-1][1] == {"thread_id": "t1", "message_id": messages[1]["id"]}
        assert (await history(url, "sk-sept-wrong")).status_code == 401

        # rotate: the new key works, the old one still right after, and is refused after the overlap
        r = await client.post("/engines/walker/rotate-key", headers=pk(key))
        assert r.status_code == 200
        key2 = r.json()["api_key"]
        assert key2 != key1
        assert (await history(url, key1)).status_code == 200  # still inside the 1 s overlap
        assert (await history(url, key2)).status_code == 200
        await wait_until(lambda: _refused(url, key1), timeout=15, interval=0.2)
        assert (await history(url, key2)).status_code == 200
        for answer in ((await client.get("/engines/walker", headers=pk(key))).json(),
                       (await client.post("/engines/walker/admit", headers=pk(key))).json()["engine"]):
            assert answer["api_key"] == key2

        # stop: the process is gone, admit refuses even with auto_provision/auto_wake
        r = await client.post("/engines/walker/stop", headers=pk(key))
        assert r.json() == {"status": "stopped", "engine_id": engine_id}
        assert await unreachable(url)
        for body in (None, {"auto_provision": True}, {"auto_wake": True}, {"auto_provision": True, "auto_wake": True}):
            r = await client.post("/engines/walker/admit", json=body, headers=pk(key))
            assert r.json() == {"admitted": False, "engine": None, "reason": "engine_stopped"}
        assert (await client.get("/engines/walker", headers=pk(key))).json()["status"] == "stopped"

        # start: same engine, same URL, data kept, the rotated key still the one
        r = await client.post("/engines/walker/start", headers=pk(key))
        assert r.json() == {"status": "running", "url": url, "engine_id": engine_id}
        r = await history(url, key2)
        assert [m["content"] for m in r.json()["messages"]] == ["hello big world", "echo: hello big world"]
        assert (await history(url, key1)).status_code == 401

        # destroy: data dir gone, process gone, row gone
        r = await client.delete("/engines/walker", headers=pk(key))
        assert r.json() == {"status": "destroyed", "engine_id": engine_id}
        assert not engine_dir(settings, engine_id).exists()
        assert await unreachable(url)
        assert_envelope(await client.get("/engines/walker", headers=pk(key)), 404, "ENGINE_NOT_FOUND")
        assert_envelope(await client.delete("/engines/walker", headers=pk(key)), 404, "ENGINE_NOT_FOUND")
        r = await client.post("/engines/walker/admit", headers=pk(key))
        assert r.json() == {"admitted": False, "engine": None, "reason": "engine_not_found"}

        # every transition left its audit row, in order, with the right actor
        rows = await pool_of(app).fetch(
            "SELECT action, actor, engine_id, user_id, metadata, duration_ms FROM audit_log "
            "WHERE product_id = $1 AND action <> 'admit_denied' ORDER BY id", product_id)
        assert [(r["action"], r["actor"]) for r in rows] == [
            ("policy_register", "admin"), ("policy_update", "admin"), ("provision", slug), ("rotate_key", slug),
            ("stop", slug), ("start", slug), ("destroy", slug)]
        assert rows[0]["metadata"]["policy"] == {"max_engines": 5}
        assert rows[1]["metadata"]["policy"] == {"max_engines": 2}
        for row in rows[2:]:
            assert (row["engine_id"], row["user_id"]) == (engine_id, "walker")
        assert rows[2]["duration_ms"] is not None and rows[2]["duration_ms"] >= 0


async def _refused(url: str, key: str) -> bool:
    return (await history(url, key)).status_code == 401


async def test_engines_survive_an_orchestrator_restart(settings: Settings, response_log: ResponseLog) -> None:
    async with open_app(settings, response_log) as (_, client):
        _, key = await register_product(client)
        r = await client.post("/engines/provision", json={"user_id": "survivor"}, headers=pk(key))
        assert r.status_code == 200
        first = r.json()
        await execute(first["url"], first["api_key"], "before restart", "r")
    # the orchestrator is gone; the engine (in its own session) is not
    r = await history(first["url"], first["api_key"])
    assert r.status_code == 200 and len(r.json()["messages"]) == 2

    async with open_app(settings, response_log) as (_, client):
        r = await client.get("/engines/survivor", headers=pk(key))
        assert r.status_code == 200
        got = r.json()
        assert (got["engine_id"], got["status"], got["url"], got["api_key"]) == (
            first["engine_id"], "running", first["url"], first["api_key"])
        r = await client.post("/engines/survivor/admit", headers=pk(key))
        assert r.json()["admitted"] is True and r.json()["engine"]["engine_id"] == first["engine_id"]
        r = await client.post("/engines/survivor/stop", headers=pk(key))
        assert r.json() == {"status": "stopped", "engine_id": first["engine_id"]}
        assert await unreachable(first["url"])
        r = await client.delete("/engines/survivor", headers=pk(key))
        assert r.json() == {"status": "destroyed", "engine_id": first["engine_id"]}
        assert not engine_dir(settings, first["engine_id"]).exists()


async def test_admit_of_a_running_engine_is_idempotent(client: httpx.AsyncClient) -> None:
    _, key = await register_product(client)
    r = await client.post("/engines/provision", json={"user_id": "again"}, headers=pk(key))
    engine = r.json()
    for auto_wake in (False, True, False):
        r = await client.post("/engines/again/admit", json={"auto_provision": True, "auto_wake": auto_wake},
                              headers=pk(key))
        doc = r.json()
        assert doc["admitted"] is True
        assert (doc["engine"]["engine_id"], doc["engine"]["api_key"]) == (engine["engine_id"], engine["api_key"])
    assert_envelope(await client.post("/engines/provision", json={"user_id": "again"}, headers=pk(key)), 409,
                    "ENGINE_ALREADY_EXISTS")
