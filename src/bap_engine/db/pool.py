"""The asyncpg connection pool, with JSON codecs for jsonb."""

from __future__ import annotations

import asyncpg
import orjson

__all__ = ["create_pool"]


async def _init(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec(
        "jsonb", encoder=lambda v: orjson.dumps(v).decode(), decoder=orjson.loads, schema="pg_catalog"
    )
    # ids travel as plain strings through every layer
    await conn.set_type_codec("uuid", encoder=str, decoder=str, schema="pg_catalog", format="text")


async def _no_reset(conn: asyncpg.Connection) -> None:
    """Pool connections hold no session state (advisory session locks live on dedicated
    connections; transactions end in their context managers), so the default reset query
    would only add a second round trip to every admit."""


async def create_pool(dsn: str, *, max_size: int = 20) -> asyncpg.Pool:
    pool = await asyncpg.create_pool(dsn, min_size=2, max_size=max_size, init=_init, command_timeout=30,
                                     reset=_no_reset)
    assert pool is not None
    return pool
