"""This process's identity as the owner of in-flight operations.

Each process holds a session advisory lock (7415004, owner_id) on a dedicated connection.
When the process dies the lock vanishes, so its unfinished ops can be taken over at once
(see registry.claim_op) instead of waiting for their deadline.
"""

from __future__ import annotations

import secrets

import asyncpg

__all__ = ["OwnerLock", "OWNER_LOCK_CLASS"]

OWNER_LOCK_CLASS = 7_415_004


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

    async def release(self) -> None:
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
