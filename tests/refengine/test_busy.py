"""``GET /health`` says ``"busy": true`` while an ``/execute`` stream is in flight, and nothing of it otherwise."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import wait_until
from tests.refengine.conftest import SpawnEngine
from tests.refengine.support import Engine, parse_sse

IDLE = {"status": "ok", "engine": "bap-refengine", "version": "0.1.0"}


async def _health(engine: Engine) -> dict[str, object]:
    async with engine.client() as c:
        r = await c.get("/health")
    assert r.status_code == 200
    doc: dict[str, object] = r.json()
    return doc


async def _idle(engine: Engine) -> bool:
    return await _health(engine) == IDLE


async def test_busy_while_streaming_and_not_after(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(REFENGINE_DELTA_DELAY_MS="150")
    assert await _health(engine) == IDLE
    async with engine.client(key) as c, c.stream("POST", "/execute", json={"message": "one two three"}) as r:
        chunks = r.aiter_text()
        first = await anext(chunks)
        assert await _health(engine) == {**IDLE, "busy": True}
        rest = "".join([part async for part in chunks])
    assert parse_sse(first + rest)[-1][0] == "done"
    assert await _health(engine) == IDLE  # the count ends with the stream, before its last byte is read


async def test_two_streams_count_until_the_last_ends(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(REFENGINE_DELTA_DELAY_MS="100")
    async with engine.client(key) as c:

        async def turn(message: str) -> str:
            async with c.stream("POST", "/execute", json={"message": message}) as r:
                return "".join([part async for part in r.aiter_text()])

        short = asyncio.create_task(turn("a"))  # echo: a -> 2 deltas
        long = asyncio.create_task(turn("a b c d e f g h"))  # 9 deltas
        await short
        assert (await _health(engine)).get("busy") is True  # the long one still runs
        await long
    assert await _health(engine) == IDLE


async def test_a_client_that_goes_away_mid_stream_ends_busy(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(REFENGINE_DELTA_DELAY_MS="200")
    words = " ".join(f"w{i}" for i in range(100))  # 20 s of stream if read to the end
    c = httpx.AsyncClient(base_url=engine.url, headers={"X-Engine-Key": key}, timeout=10)
    async with c.stream("POST", "/execute", json={"message": words, "thread_id": "gone"}) as r:
        await anext(r.aiter_text())
        assert (await _health(engine)).get("busy") is True
    await c.aclose()  # the connection is closed with the stream mid-way
    await wait_until(lambda: _idle(engine), timeout=3, interval=0.05)  # seen at the next write or two
    async with engine.client(key) as other:
        history = (await other.get("/history", params={"thread_id": "gone"})).json()["messages"]
    assert [m["role"] for m in history] == ["user"]  # the turn did not complete
