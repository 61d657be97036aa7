"""This process's identity as the owner of in-flight operations.

Each process holds a session advisory lock (7415004, owner_id) on a dedicated connection.
When the process dies the lock vanishes, so its unfinished ops can be taken over at once
(see registry.claim_op) instead of waiting for their deadline.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

import asyncpg

__all__ = ["OwnerLock", "OWNER_LOCK_CLASS"]

OWNER_LOCK_CLASS = 7_415_004
_PING_S = 2.0
_DB_LOST = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
log = logging.getLogger("bap_engine.owner")


class OwnerLock:
    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._conn: asyncpg.Connection | None = None
        self.owner_id = 0

    async def acquire(self) -> int:
        self._conn = await asyncpg.connect(self._dsn)
        while True:
            candidate = secrets.randbelow(2**31 - 2) + 1
            got = await self._conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", OWNER_LOCK_CLASS, candidate)
            if got:
                self.owner_id = candidate
                return candidate

    async def keep(self) -> None:
        """Hold the lock for good (supervised): when Postgres restarts or the session is killed,
        reconnect and take the same lock again, so the ops this process holds stay its own."""
        while True:
            await asyncio.sleep(_PING_S)
            if await self._alive():
                continue
            log.warning("owner lock lost with its connection; re-taking it", extra={"owner_id": self.owner_id})
            while not await self._retake():
                await asyncio.sleep(_PING_S)
            log.info("owner lock re-taken", extra={"owner_id": self.owner_id})

    async def _alive(self) -> bool:
        try:
            return self._conn is not None and await asyncio.wait_for(self._conn.fetchval("SELECT 1"), _PING_S * 2)
        except _DB_LOST:
            return False

    async def _retake(self) -> bool:
        if self._conn is not None:
            self._conn.terminate()
            self._conn = None
        try:
            self._conn = await asyncpg.connect(self._dsn, timeout=_PING_S * 2)
            got = await self._conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", OWNER_LOCK_CLASS, self.owner_id)
        except _DB_LOST:
            return False
        if not got:  # only a process with our random id could hold it: never expected
            raise RuntimeError("the owner lock of this process is held by another session")
        return True

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
