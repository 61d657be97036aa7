"""SIGTERM with open GET /events streams: the streams end at once and the server exits promptly,
instead of uvicorn waiting out its whole graceful-shutdown timeout for them."""

from __future__ import annotations

import socket
import time

import httpx

from tests.conftest import ADMIN_KEY
from tests.e2e.conftest import StartServer


def _open_stream(url: str, key: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"GET /events HTTP/1.1\r\nHost: {host}\r\nX-Platform-Key: {key}\r\n\r\n".encode())
    assert b"200 OK" in sock.recv(4096)
    return sock


def test_sigterm_ends_open_streams(start_server: StartServer) -> None:
    server = start_server()
    r = httpx.post(f"{server.url}/products/register", headers={"X-Admin-Key": ADMIN_KEY},
                   json={"slug": f"sse-stop-{time.monotonic_ns()}", "display_name": "SSE stop"})
    key = str(r.json()["platform_api_key"])
    streams = [_open_stream(server.url, key) for _ in range(3)]
    started = time.monotonic()
    server.proc.terminate()
    assert server.proc.wait(15) in (0, -15)  # uvicorn re-raises the SIGTERM it handled
    took = time.monotonic() - started
    assert took < 5, f"shutdown took {took:.1f} s with open streams (the graceful timeout is 10 s)"
    for sock in streams:  # each stream was ended by the server (EOF after its last chunk)
        sock.settimeout(5)
        while chunk := sock.recv(4096):
            assert b"event:" not in chunk or b"data:" in chunk
        sock.close()
