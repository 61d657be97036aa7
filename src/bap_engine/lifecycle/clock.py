"""The clock of record for engine rows (UTC, aware); workers inject their own for tests."""

from __future__ import annotations

from datetime import UTC, datetime

__all__ = ["now"]


def now() -> datetime:
    return datetime.now(UTC)
