"""HTTP calls from the orchestrator to an engine: the health probe and live key rotation.

`probe_status` also reads whether the engine works (`"busy": true` in its /health body: a stream in
flight, a background job), which keeps it from being put to sleep; `probe_health` is its yes/no.

The probe is on the hot path of every boot, wake and health sweep (thousands of engines),
so it is one short-lived connection parsed with h11 rather than a full client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from typing import NamedTuple
from urllib.parse import urlsplit

import h11
import orjson

__all__ = ["Probe", "probe_status", "probe_health", "wait_healthy", "call_engine", "push_key", "EngineReply"]

_MAX_BODY = 64 * 1024


class EngineReply:
    __slots__ = ("status", "body")

    def __init__(self, status: int, body: bytes) -> None:
        self.status = status
        self.body = body


async def _exchange(url: str, method: str, path: str, headers: list[tuple[str, str]], body: bytes) -> EngineReply:
    # A bare non-blocking socket, not asyncio streams: while engines boot most probes meet a
    # refused connection, and a transport/protocol pair per attempt cost more CPU than the
    # engines' own start on a busy core.
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    loop = asyncio.get_running_loop()
    family, address = await _address(loop, host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, address)
        conn = h11.Connection(h11.CLIENT)
        hdrs = [("Host", f"{host}:{port}"), ("Connection", "close"), *headers]
        if body:
            hdrs.append(("Content-Length", str(len(body))))
        data = conn.send(h11.Request(method=method, target=path, headers=hdrs))
        data += conn.send(h11.Data(data=body)) if body else b""
        data += conn.send(h11.EndOfMessage())
        await loop.sock_sendall(sock, data)
        return await _read_reply(loop, sock, conn)
    finally:
        sock.close()


async def _address(loop: asyncio.AbstractEventLoop, host: str, port: int) -> tuple[int, tuple[str, int]]:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # a name (Kubernetes service DNS): resolve it
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        family, _, _, _, address = infos[0]
        return int(family), (str(address[0]), int(address[1]))
    return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)


async def _read_reply(loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: h11.Connection) -> EngineReply:
    status, chunks = 0, bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await loop.sock_recv(sock, 65536))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            chunks += event.data
            if len(chunks) > _MAX_BODY:
                break
        elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    return EngineReply(status, bytes(chunks))


class Probe(NamedTuple):
    """One /health answer: `ok` (2xx, JSON status "ok"), and `busy` (ok, and the body says "busy": true)."""

    ok: bool
    busy: bool = False


_DOWN, _IDLE, _BUSY = Probe(False), Probe(True), Probe(True, True)


async def probe_status(url: str, timeout: float) -> Probe:
    """GET /health within timeout: healthy, and working (`"busy": true`; anything else is not busy)."""
    try:
        reply = await asyncio.wait_for(_exchange(url, "GET", "/health", [], b""), timeout)
    except (OSError, TimeoutError, h11.ProtocolError):
        return _DOWN
    if not 200 <= reply.status < 300:
        return _DOWN
    try:
        doc = orjson.loads(reply.body)
    except orjson.JSONDecodeError:
        return _DOWN
    if not isinstance(doc, dict) or doc.get("status") != "ok":
        return _DOWN
    return _BUSY if doc.get("busy") is True else _IDLE


async def probe_health(url: str, timeout: float) -> bool:
    """True when GET /health answers 2xx with JSON status "ok" within timeout."""
    return (await probe_status(url, timeout)).ok


async def wait_healthy(url: str, timeout: float, probe_timeout: float) -> bool:
    """Poll /health until ok or `timeout`: every 5 ms at first, growing x1.5 to 100 ms, so a fast
    engine is seen at once and a slow one costs few probes."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if await probe_health(url, min(left, probe_timeout)):
            return True
        await asyncio.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(delay * 1.5, 0.1)


async def call_engine(
    url: str, method: str, path: str, *, key: str, payload: dict[str, object], timeout: float
) -> EngineReply:
    """An authenticated JSON call to the engine. Raises OSError/TimeoutError on transport failure."""
    headers = [("X-Engine-Key", key), ("Content-Type", "application/json")]
    return await asyncio.wait_for(_exchange(url, method, path, headers, orjson.dumps(payload)), timeout)


async def push_key(url: str, auth: str, new_key_hash: str, overlap_s: int, timeout: float) -> int:
    """POST /_bap/rotate-key with the current key `auth`; the HTTP status, or 0 when the engine
    did not answer."""
    try:
        reply = await call_engine(url, "POST", "/_bap/rotate-key", key=auth, timeout=timeout,
                                  payload={"key_hash": new_key_hash, "overlap_seconds": overlap_s})
    except (OSError, TimeoutError, h11.ProtocolError):
        return 0
    return reply.status
