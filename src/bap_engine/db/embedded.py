"""Embedded Postgres (pgserver) under ORCH_DATA_DIR/pg, for the zero-setup default."""

from __future__ import annotations

import asyncio
import contextlib
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

__all__ = ["embedded_postgres"]


def _start(pgdata: Path) -> tuple[object, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

        server = pgserver.get_server(pgdata, cleanup_mode="stop")  # type: ignore[attr-defined]
    return server, str(server.get_uri())


@contextlib.asynccontextmanager
async def embedded_postgres(data_dir: Path) -> AsyncIterator[str]:
    """Start (or join) the embedded server and yield its DSN; stop it on exit."""
    pgdata = (data_dir / "pg").resolve()
    pgdata.mkdir(parents=True, exist_ok=True)
    server, dsn = await asyncio.to_thread(_start, pgdata)
    try:
        yield dsn
    finally:
        cleanup = getattr(server, "cleanup", None)
        if cleanup is not None:
            await asyncio.to_thread(cleanup)
