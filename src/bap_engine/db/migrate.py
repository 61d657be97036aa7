"""Apply Alembic migrations and check whether the schema is current."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

__all__ = ["upgrade", "head_revision", "is_current"]

_INI = Path(__file__).with_name("alembic.ini")


def _config(dsn: str) -> Config:
    cfg = Config(str(_INI))
    cfg.set_main_option("script_location", str(Path(__file__).with_name("migrations")))
    url = dsn.replace("postgresql://", "postgresql+asyncpg://", 1).replace("%", "%%")
    cfg.set_main_option("sqlalchemy.url", url)
    return cfg


def head_revision() -> str:
    script = ScriptDirectory(str(Path(__file__).with_name("migrations")))
    head = script.get_current_head()
    assert head is not None
    return head


async def upgrade(dsn: str) -> None:
    """`alembic upgrade head`, in a thread (Alembic runs its own event loop)."""
    await asyncio.to_thread(command.upgrade, _config(dsn), "head")


async def is_current(conn: asyncpg.Connection, head: str) -> bool:
    try:
        version = await conn.fetchval("SELECT version_num FROM alembic_version")
    except asyncpg.UndefinedTableError:
        return False
    return bool(version == head)
