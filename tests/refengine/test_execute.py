"""``POST /execute`` streaming and ``GET /history`` persistence, against the real engine."""

from __future__ import annotations

import re
import sqlite3

import httpx

from tests.refengine.conftest import SpawnEngine
from tests.refengine.support import parse_sse

ISO_UTC_MS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


async def _execute(c: httpx.AsyncClient, body: dict[str, object]) -> tuple[httpx.Response, str]:
    async with c.stream("POST", "/execute", json=body) as r:
        text = "".join([part async for part in r.aiter_text()])
    return r, text


async def test_execute_streams_exact_sse_events_and_persists(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    async with engine.client(key) as c:
        r, text = await _execute(c, {"message": "hello big world", "thread_id": "t1"})
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        assert r.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in r.headers
        history = (await c.get("/history", params={"thread_id": "t1"})).json()["messages"]
    user, reply = history
    assert text == (
        'event: thread_lifecycle\ndata: {"thread_id":"t1","state":"started"}\n\n'
        'event: text_delta\ndata: {"delta":"echo: "}\n\n'
        'event: text_delta\ndata: {"delta":"hello "}\n\n'
        'event: text_delta\ndata: {"delta":"big "}\n\n'
        'event: text_delta\ndata: {"delta":"world"}\n\n'
        f'event: done\ndata: {{"thread_id":"t1","message_id":{reply["id"]}}}\n\n'
    )
    assert (user["thread_id"], user["role"], user["content"]) == ("t1", "user", "hello big world")
    assert (reply["thread_id"], reply["role"], reply["content"]) == ("t1", "assistant", "echo: hello big world")
    assert user["id"] < reply["id"]
    assert ISO_UTC_MS.fullmatch(user["created_at"]) and ISO_UTC_MS.fullmatch(reply["created_at"])
    # The rows are really in SQLite at SQLITE_DB_PATH, in the contract's table.
    with sqlite3.connect(engine.db_path) as db:
        rows = db.execute("SELECT id, thread_id, role, content FROM messages ORDER BY id").fetchall()
    assert rows == [(user["id"], "t1", "user", "hello big world"), (reply["id"], "t1", "assistant", reply["content"])]


async def test_deltas_concatenate_to_the_stored_reply(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    message = 'multi  space\nline "quoted" ünïcødé'
    async with engine.client(key) as c:
        _, text = await _execute(c, {"message": message})
        (reply,) = [m for m in (await c.get("/history")).json()["messages"] if m["role"] == "assistant"]
    events = parse_sse(text)
    deltas = [str(data["delta"]) for name, data in events if name == "text_delta"]
    assert "".join(deltas) == "echo: " + message == reply["content"]
    assert len(deltas) == 6
    assert events[-1] == ("done", {"thread_id": "default", "message_id": reply["id"]})
    assert reply["thread_id"] == "default"


async def test_stream_is_sent_incrementally(spawn: SpawnEngine, key: str) -> None:
    """The first event arrives while the turn is still running (the reply is not stored yet)."""
    engine = await spawn(REFENGINE_DELTA_DELAY_MS="250")
    async with engine.client(key) as c, engine.client(key) as other:
        async with c.stream("POST", "/execute", json={"message": "one two three", "thread_id": "s"}) as r:
            chunks = r.aiter_text()
            first = await anext(chunks)
            assert first.startswith("event: thread_lifecycle\n")
            mid = (await other.get("/history", params={"thread_id": "s"})).json()["messages"]
            assert [m["role"] for m in mid] == ["user"]
            rest = "".join([part async for part in chunks])
        assert parse_sse(first + rest)[-1][0] == "done"
        done = (await other.get("/history", params={"thread_id": "s"})).json()["messages"]
        assert [m["role"] for m in done] == ["user", "assistant"]


async def test_history_is_oldest_first_and_filters_by_thread(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    async with engine.client(key) as c:
        for thread, message in (("a", "first"), ("b", "second"), ("a", "third")):
            r, _ = await _execute(c, {"message": message, "thread_id": thread})
            assert r.status_code == 200
        everything = (await c.get("/history")).json()["messages"]
        only_a = (await c.get("/history", params={"thread_id": "a"})).json()["messages"]
        unknown = (await c.get("/history", params={"thread_id": "zzz"})).json()
    assert [(m["thread_id"], m["content"]) for m in everything] == [
        ("a", "first"),
        ("a", "echo: first"),
        ("b", "second"),
        ("b", "echo: second"),
        ("a", "third"),
        ("a", "echo: third"),
    ]
    assert [m["id"] for m in everything] == sorted(m["id"] for m in everything)
    assert set(everything[0]) == {"id", "thread_id", "role", "content", "created_at"}
    assert [m["content"] for m in only_a] == ["first", "echo: first", "third", "echo: third"]
    assert unknown == {"messages": []}


async def test_messages_survive_a_restart(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    async with engine.client(key) as c:
        await _execute(c, {"message": "remember me", "thread_id": "m"})
    assert await engine.stop() == 0
    again = await spawn(data_dir=engine.data_dir)
    async with again.client(key) as c:
        contents = [m["content"] for m in (await c.get("/history")).json()["messages"]]
    assert contents == ["remember me", "echo: remember me"]
