"""The listening socket, the set of live connections, and graceful shutdown.

Owns accept and stop: ``serve`` listens until ``stop`` is set, then stops accepting, closes idle
keep-alive connections at once, lets busy ones finish their response for up to ``grace`` seconds
and cancels whatever is left. It knows nothing of routes, keys or SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from .connection import Connection, RequestHandler

__all__ = ["HttpServer"]

_log = logging.getLogger("bap_refengine.server")


class HttpServer:
    """Serves ``handler`` on ``host:port`` until stopped."""

    def __init__(self, handler: RequestHandler, host: str, port: int, grace: float) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._grace = grace
        self._closing = False
        self._live: dict[asyncio.Task[None], Connection] = {}

    def _is_closing(self) -> bool:
        return self._closing

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None  # asyncio runs every client callback in its own task
        sock = writer.get_extra_info("socket")
        if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Small SSE events must leave at once, not wait for Nagle's algorithm.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Connection(reader, writer, self._handler, self._is_closing)
        self._live[task] = conn
        try:
            await conn.serve()
        except asyncio.CancelledError:
            pass  # cancelled by shutdown; ending quietly keeps asyncio from logging it
        except Exception:
            _log.exception("connection failed")
        finally:
            self._live.pop(task, None)

    async def serve(self, stop: asyncio.Event, ready: asyncio.Event | None = None) -> None:
        """Listen until ``stop`` is set, then shut down gracefully."""
        server = await asyncio.start_server(self._on_client, self._host, self._port, reuse_address=True)
        bound = ", ".join(str(s.getsockname()[:2]) for s in server.sockets)
        _log.info("listening on %s", bound)
        if ready is not None:
            ready.set()
        await stop.wait()
        self._closing = True
        server.close()  # stop accepting
        await self._drain()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), timeout=1.0)

    async def _drain(self) -> None:
        for task, conn in list(self._live.items()):
            if not conn.busy:
                task.cancel()
        pending = set(self._live)
        if not pending:
            return
        _log.info("waiting up to %.1f s for %d connection(s)", self._grace, len(pending))
        _, late = await asyncio.wait(pending, timeout=self._grace)
        for task in late:
            task.cancel()
        if late:
            _log.warning("cancelled %d response(s) still running after the grace period", len(late))
            await asyncio.wait(late, timeout=1.0)
