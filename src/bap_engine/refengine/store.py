"""The engine's persistent memory: chat messages in SQLite.

Owns one SQLite connection in WAL mode on ``SQLITE_DB_PATH``. Every statement is a single small
indexed insert or select, so it runs on the event loop thread rather than paying for a thread hop;
an engine with heavy queries would move them to ``asyncio.to_thread``. It must never hold a
transaction open across an ``await``.
"""

from __future__ import annotations

import os
import sqlite3
import time
from enum import StrEnum
from typing import NamedTuple

__all__ = ["Message", "MessageStore", "Role"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY,
    thread_id TEXT NOT NULL,
    role TEXT NOT NULL,
    content TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS messages_thread_id ON messages (thread_id, id);
"""


def _utc_now() -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-28T18:43:14.632Z (datetime costs start time)."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


class Role(StrEnum):
    """Who wrote a message."""

    USER = "user"
    ASSISTANT = "assistant"


class Message(NamedTuple):
    """One stored message."""

    id: int
    thread_id: str
    role: str
    content: str
    created_at: str

    def to_json(self) -> dict[str, object]:
        """The wire form used by ``GET /history``."""
        return {
            "id": self.id,
            "thread_id": self.thread_id,
            "role": self.role,
            "content": self.content,
            "created_at": self.created_at,
        }


class MessageStore:
    """Append and list messages; ``open`` creates the data directory and schema when missing."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    @classmethod
    def open(cls, path: str) -> MessageStore:
        """Open (or create) the database at ``path``."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        fresh = not os.path.exists(path)
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=5000")
        if fresh:
            # A new file holds nothing to lose, and its fsyncs (WAL switch, schema) were most of a
            # first boot's start time; from here on writes are synced as NORMAL below.
            conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(f"BEGIN;{_SCHEMA}COMMIT;")
        conn.execute("PRAGMA synchronous=NORMAL")
        return cls(conn)

    def append(self, thread_id: str, role: Role, content: str) -> Message:
        """Store one message and return it with its id."""
        created_at = _utc_now()
        cur = self._conn.execute(
            "INSERT INTO messages (thread_id, role, content, created_at) VALUES (?, ?, ?, ?)",
            (thread_id, role.value, content, created_at),
        )
        assert cur.lastrowid is not None  # always set after a successful INSERT
        return Message(cur.lastrowid, thread_id, role.value, content, created_at)

    def history(self, thread_id: str | None = None) -> list[Message]:
        """Messages of one thread (or of every thread when None), oldest first."""
        sql = "SELECT id, thread_id, role, content, created_at FROM messages"
        params: tuple[str, ...] = ()
        if thread_id is not None:
            sql += " WHERE thread_id = ?"
            params = (thread_id,)
        rows = self._conn.execute(sql + " ORDER BY id", params).fetchall()
        return [Message(int(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4])) for r in rows]

    def close(self) -> None:
        """Checkpoint the WAL and close the connection."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
