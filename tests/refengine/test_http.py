"""Health, authentication, routing, body validation and HTTP/1.1 behaviour of the real engine."""

from __future__ import annotations

import asyncio

from tests.refengine.conftest import SpawnEngine
from tests.refengine.support import Engine, sha256_hex

INVALID_KEY = {"error": "INVALID_KEY", "message": "invalid or missing X-Engine-Key"}


async def test_health_needs_no_key_and_reports_engine(spawn: SpawnEngine) -> None:
    engine = await spawn()
    async with engine.client() as c:
        r = await c.get("/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.content)
    assert r.json() == {"status": "ok", "engine": "bap-refengine", "version": "0.1.0"}


async def test_health_echoes_engine_version(spawn: SpawnEngine) -> None:
    engine = await spawn(ENGINE_VERSION="2.3.4")
    async with engine.client() as c:
        assert (await c.get("/health")).json()["version"] == "2.3.4"


async def test_missing_or_wrong_key_is_401_on_every_other_route(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    for client_key in (None, "wrong", key.upper(), sha256_hex(key)):
        async with engine.client(client_key) as c:
            for method, path in (("GET", "/history"), ("POST", "/execute"), ("POST", "/_bap/rotate-key")):
                r = await c.request(method, path, json={"message": "hi"})
                assert (r.status_code, r.json()) == (401, INVALID_KEY), (client_key, path)
            # Without a valid key even an unknown route says 401, so routes cannot be probed.
            assert (await c.get("/nope")).status_code == 401
    async with engine.client(key) as c:
        assert (await c.get("/history")).status_code == 200


async def test_plaintext_engine_api_key_mode(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn(ENGINE_KEY_HASH=None, ENGINE_API_KEY=key)
    async with engine.client(key) as c:
        assert (await c.get("/history")).json() == {"messages": []}
    async with engine.client("other") as c:
        assert (await c.get("/history")).status_code == 401


async def test_unknown_route_404_and_wrong_method_405(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    async with engine.client(key) as c:
        r = await c.get("/does/not/exist")
        assert r.status_code == 404
        assert r.json()["error"] == "NOT_FOUND" and isinstance(r.json()["message"], str)
        r = await c.get("/execute")
        assert (r.status_code, r.json()["error"], r.headers["allow"]) == (405, "METHOD_NOT_ALLOWED", "POST")
        r = await c.post("/history")
        assert (r.status_code, r.headers["allow"]) == (405, "GET")


async def test_bad_json_and_bad_fields_are_400(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    bad_bodies = [
        b"{not json",
        b"",
        b"[1, 2]",
        b"\xff\xfe",
        b'{"thread_id": "t"}',
        b'{"message": 5}',
        b'{"message": ""}',
        b'{"message": "hi", "thread_id": 7}',
        b'{"message": "hi", "thread_id": ""}',
    ]
    async with engine.client(key) as c:
        for body in bad_bodies:
            r = await c.post("/execute", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, body
            assert r.json()["error"] == "VALIDATION_ERROR" and r.json()["message"], body
        assert (await c.get("/history", params={"thread_id": ""})).status_code == 400
        # Nothing was stored by the rejected calls.
        assert (await c.get("/history")).json() == {"messages": []}


async def test_oversized_body_is_413(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    async with engine.client(key) as c:
        r = await c.post("/execute", content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413
    assert r.json()["error"] == "PAYLOAD_TOO_LARGE"


async def _raw_exchange(engine: Engine, data: bytes, responses: int) -> list[bytes]:
    """Send raw bytes on one TCP connection and read ``responses`` Content-Length responses."""
    reader, writer = await asyncio.open_connection("127.0.0.1", engine.port)
    try:
        writer.write(data)
        await writer.drain()
        out = []
        for _ in range(responses):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            out.append(head + await reader.readexactly(length))
        return out
    finally:
        writer.close()
        await writer.wait_closed()


async def test_keep_alive_serves_pipelined_requests_on_one_connection(spawn: SpawnEngine, key: str) -> None:
    engine = await spawn()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    history = f"GET /history HTTP/1.1\r\nHost: x\r\nX-Engine-Key: {key}\r\n\r\n".encode()
    first, second, third = await _raw_exchange(engine, request + history + request, 3)
    assert first.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in first
    assert second.startswith(b"HTTP/1.1 200 ") and second.endswith(b'{"messages":[]}')
    assert third.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" not in first.lower()


async def test_malformed_http_gets_400_and_close(spawn: SpawnEngine) -> None:
    engine = await spawn()
    (response,) = await _raw_exchange(engine, b"NOT HTTP AT ALL\r\n\r\n", 1)
    assert response.startswith(b"HTTP/1.1 400 ")
    assert b"connection: close" in response.lower()
    assert b'"error":"VALIDATION_ERROR"' in response
